"""Reduced-resolution vs full decode per codec, measured side by side (interleaved) in one run.

For each real chest file (one per codec), ``--rounds`` times, alternating full and reduced:
  decode ms   read_radiograph (+ preprocess to the model input), one process
  score ms    decode + preprocess + the model on that one image (batch 1)
  ratio       full / reduced (robust to a shared CPU: both run in the same minute)
  |d risk|    |risk(reduced) - risk(full)|
Reduced decode is ``read_radiograph(path, reduce_to=decode_size(spec))`` (triage.decode: 4 x the model
input). The "1x" columns decode at the level just above the model input instead (reduce_to=spec.size):
faster, but further from the full-decode risk. "served" says whether the bundle reduces that codec when it
scores (its manifest's ``decode.reduced``: only codecs its export measured within 0.01 of a full decode).

With ``--backends`` it times instead each codec's full decode (``pydicom.pixels.pixel_array`` with
``decoding_plugin=``) with every installed pydicom plugin, side by side (interleaved), one real file per codec:
"before" is pylibjpeg (with pylibjpeg-libjpeg, GPL-3.0, for JPEG and JPEG-LS; until issue 15 the first
plugin pydicom tried), "after" the first plugin of ``triage.ingest.DECODING_PLUGINS`` that decodes the file.
To see both in one run, install pylibjpeg-libjpeg into a throwaway copy of the environment.

Usage: python benchmarks/bench_decode.py [--bundle DIR] [--rounds 5] [--backends]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder, pixel_array

from deploy.paths import default_bundle_dir
from triage.bundle import load_bundle
from triage.decode import codec_family, decode_size
from triage.inference import load_model
from triage.ingest import decoding_plugins, read_radiograph
from triage.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "dicom" / "chest"
FILES = {
    "j2k-lossless": get_testdata_file("RG1_J2KR.dcm"),
    "j2k-lossy": str(ROOT / "samples" / "dicom" / "philips-cr-chest-pa-j2k.dcm"),
    "jpeg-baseline (philips)": str(ROOT / "tests" / "data" / "reduced" / "philips-cr-pa-jpeg-baseline.dcm"),
    "jpeg-baseline (konica)": str(SHARED / "konica-cr-pa-mono1-jpeg-baseline.dcm"),
    "jpeg-baseline (siim 1024)": str(SHARED / "siim-cr-mono2-jpeg-baseline.dcm"),
    "jpeg-ls": str(SHARED / "philips-cr-pa-mono1-jpegls-nearlossless.dcm"),
}

OUT_OF_SCOPE = SHARED.parent / "out-of-scope"
BACKEND_FILES = {  # one real file per codec; RLE and deflate have one decoder each (pydicom's), so no comparison
    "jpeg-baseline (konica)": str(SHARED / "konica-cr-pa-mono1-jpeg-baseline.dcm"),
    "jpeg-baseline (siim 1024)": str(SHARED / "siim-cr-mono2-jpeg-baseline.dcm"),
    "jpeg-extended 12-bit": get_testdata_file("JPGExtended.dcm"),
    "jpeg-extended 12-bit (fuji)": str(SHARED.parent / "undecodable" / "fuji-cr-hip-jpeg-extended-corrupt.dcm"),
    "jpeg-lossless sv1 (dental)": str(OUT_OF_SCOPE / "dental-panoramic-mono1-jpeg-lossless-modality-lut.dcm"),
    "jpeg-ls near-lossless": str(SHARED / "philips-cr-pa-mono1-jpegls-nearlossless.dcm"),
    "jpeg-ls lossless (fuji)": str(OUT_OF_SCOPE / "fuji-cr-hip-mono2-jpegls-lossless.dcm"),
    "j2k-lossless": get_testdata_file("RG1_J2KR.dcm"),
    "j2k-lossy": str(SHARED / "philips-cr-pa-mono1-j2k-lossy.dcm"),
}
BEFORE = "pylibjpeg"


def timed_decode(ds: Dataset, plugin: str) -> float | None:
    """ms to decode the pixel data with one pydicom plugin; None when that plugin refuses the file."""
    start = time.perf_counter()
    try:
        pixel_array(ds, decoding_plugin=plugin)
    except (RuntimeError, ValueError, NotImplementedError):
        return None
    return (time.perf_counter() - start) * 1000


def compare_backends(rounds: int) -> None:
    """Median full-decode ms per codec and plugin, and after / before."""
    print(f"full decode (pixel_array), median of {rounds} interleaved rounds, ms per plugin; '-' = the plugin refuses "
          f"the file; before = {BEFORE} (libjpeg for JPEG/JPEG-LS when installed), after = triage.ingest's choice")
    print(f"{'codec':<28} {'px':>10}  {'ms per plugin':<52} {'before':>14} {'after':>18} {'after/before':>12}")
    for codec, path in BACKEND_FILES.items():
        if not Path(path).is_file():
            print(f"{codec:<28} (skipped: {path} is absent)")
            continue
        ds = dcmread(path)
        syntax = ds.file_meta.TransferSyntaxUID
        plugins = get_decoder(syntax).available_plugins
        for plugin in plugins:  # warm the file cache and each library
            timed_decode(ds, plugin)
        times: dict[str, list[float | None]] = {plugin: [] for plugin in plugins}
        for _ in range(rounds):
            for plugin in plugins:
                times[plugin].append(timed_decode(ds, plugin))
        ms = {p: None if None in t else statistics.median(t) for p, t in times.items()}
        after = next((p for p in decoding_plugins(syntax) if ms.get(p) is not None), None)
        cells = " ".join(f"{p} {'-' if t is None else f'{t:.0f}'}" for p, t in ms.items())
        before_ms, after_ms = ms.get(BEFORE), ms.get(after)
        ratio = f"{after_ms / before_ms:12.2f}" if before_ms and after_ms else f"{'n/a':>12}"
        print(f"{codec:<28} {ds.Rows:>4}x{ds.Columns:<5}  {cells:<52} "
              f"{'-' if before_ms is None else f'{before_ms:.1f}':>14} "
              f"{f'{after} {after_ms:.1f}' if after else 'none':>18} {ratio}")


def timed_score(path: str, model, reduce_to) -> tuple[float, float, float, tuple[int, int]]:
    """(decode+preprocess ms, score ms, risk, decoded shape) for one file."""
    column = model.bundle.findings.index(model.bundle.triage_finding)
    start = time.perf_counter()
    radiograph = read_radiograph(path, reduce_to=reduce_to)
    model_input = preprocess(radiograph, model.bundle.preprocessing)
    decoded = time.perf_counter()
    risk = float(model.risks(model_input[None])[0, column])
    done = time.perf_counter()
    return (decoded - start) * 1000, (done - start) * 1000, risk, radiograph.pixels.shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(default_bundle_dir()))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backends", action="store_true", help="compare pydicom's decoding plugins per codec instead")
    args = parser.parse_args()
    if args.backends:
        compare_backends(args.rounds)
        return
    bundle = load_bundle(args.bundle)
    model = load_model(bundle, "cpu")
    target = decode_size(bundle.preprocessing)
    print(f"bundle {bundle.name} {bundle.version}, provider {model.provider}, reduce_to {target}, "
          f"median of {args.rounds} interleaved rounds; absolute ms are on a shared CPU, the ratios are the result")
    print(f"{'codec':<26} {'full px':>11} {'reduced px':>11} {'full ms':>8} {'red. ms':>8} {'decode x':>8} "
          f"{'score x':>8} {'|d risk|':>8} {'served':>7} {'1x px':>9} {'1x score x':>10} {'1x |d risk|':>11}")
    served = lambda path: "reduced" if codec_family(dcmread(path, stop_before_pixels=True)) in bundle.reduced_decode else "full"  # noqa: E731
    for codec, path in FILES.items():
        if not Path(path).is_file():
            print(f"{codec:<26} (skipped: {path} is absent)")
            continue
        timed_score(path, model, None)  # warm the file cache and the session
        full, reduced, one = [], [], []
        for _ in range(args.rounds):
            full.append(timed_score(path, model, None))
            reduced.append(timed_score(path, model, target))
            one.append(timed_score(path, model, bundle.preprocessing.size))
        o_score = statistics.median(t[1] for t in one)
        f_dec, r_dec = (statistics.median(t[0] for t in runs) for runs in (full, reduced))
        f_score, r_score = (statistics.median(t[1] for t in runs) for runs in (full, reduced))
        shape = lambda runs: "x".join(map(str, runs[0][3]))  # noqa: E731
        print(f"{codec:<26} {shape(full):>11} {shape(reduced):>11} {f_dec:8.1f} {r_dec:8.1f} {f_dec / r_dec:8.2f} "
              f"{f_score / r_score:8.2f} {abs(full[0][2] - reduced[0][2]):8.4f} {served(path):>7} {shape(one):>9} {f_score / o_score:10.2f} "
              f"{abs(full[0][2] - one[0][2]):11.4f}")


if __name__ == "__main__":
    main()
