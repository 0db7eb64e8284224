"""Training recipes on tiny synthetic data (seconds): cache, augmentation, one-cycle, LR groups, freezing,
masked labels, EMA, DenseNet-121, the LR finder and a whole run folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch", reason="training tests need the train extra (torch, monai)")
pytest.importorskip("monai", reason="training tests need the train extra (torch, monai)")

from training import cache as cache_mod  # noqa: E402
from training.augment import augment_batch, default_augment  # noqa: E402
from training.model import build_network, freeze_body, head, layer_groups, network_from_config  # noqa: E402
from training.recipes import ModelEma, adamw, discriminative_lrs, lr_find, one_cycle  # noqa: E402
from training.train import (  # noqa: E402
    Caches, TrainConfig, Trainer, fine_tune, load_config, make_loss, prepare_split, run, run_phase, save_checkpoint)
from triage.ingest import read_radiograph  # noqa: E402
from triage.preprocess import PreprocessSpec, preprocess  # noqa: E402

SIZE = 64


def write_dataset(folder: Path, n: int = 48, size: int = SIZE, extra_column: bool = False) -> Path:
    """``n`` grey PNGs (positives carry a bright square), two images per patient, and a labels CSV."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        positive = (i // 2) % 2
        pixels = rng.normal(90, 25, (size, size))
        if positive:
            pixels[size // 4:3 * size // 4, size // 4:3 * size // 4] += 90
        path = f"images/{i:03d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / path)
        row = {"path": path, "patient_id": f"P{i // 2}", "pneumonia": str(positive)}
        if extra_column:
            row["effusion"] = ""  # unknown for every image
        rows.append(row)
    labels = folder / "labels.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return labels


def tiny_config(tmp: Path, labels: Path, **changes) -> TrainConfig:
    values = dict(data=str(labels), dataset="csv", out=str(tmp / "run"), size=SIZE, size_frozen=48,
                  stages=[[48, 1], [SIZE, 1]], batch_size=8, cache_dir=str(tmp / "cache"), val_fraction=0.25,
                  preprocessing=PreprocessSpec(size=(SIZE, SIZE)).to_dict())
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("cxr"))


# --- cache ------------------------------------------------------------------------------------


def test_cache_reproduces_triage_preprocess_exactly_for_8_bit_images_at_their_size(dataset, tmp_path):
    paths = sorted(str(p) for p in (dataset.parent / "images").glob("*.png"))[:6]
    spec = PreprocessSpec(size=(SIZE, SIZE))
    cached = cache_mod.build_cache(paths, [None] * len(paths), spec, tmp_path)
    serving = np.stack([preprocess(read_radiograph(p), spec) for p in paths])
    assert cached.images.dtype == np.uint8 and cached.images.shape == (6, SIZE, SIZE)
    np.testing.assert_array_equal(cached.inputs(range(6)), serving)  # bit for bit
    assert json.loads((cached.path.with_suffix(".json")).read_text())["max_unit_error"] == 0.0


def test_resized_cache_is_within_the_documented_quantization_bound(dataset, tmp_path):
    paths = sorted(str(p) for p in (dataset.parent / "images").glob("*.png"))[:6]
    spec = PreprocessSpec(size=(37, 45))  # a resize: float values between the uint8 steps
    cached = cache_mod.build_cache(paths, [None] * len(paths), spec, tmp_path)
    serving = np.stack([preprocess(read_radiograph(p), spec) for p in paths])
    error = np.abs(cached.inputs(range(6)) - serving).max()
    bound = cache_mod.QUANTIZATION_BOUND / spec.std
    assert 0 < error <= bound * (1 + 1e-5), (error, bound)
    assert error > 0.5 * bound  # the bound is tight, not vacuous


def test_cache_is_reused_and_keyed_by_spec_and_files(dataset, tmp_path):
    paths = sorted(str(p) for p in (dataset.parent / "images").glob("*.png"))[:4]
    spec = PreprocessSpec(size=(SIZE, SIZE))
    first = cache_mod.build_cache(paths, [None] * 4, spec, tmp_path)
    again = cache_mod.build_cache(paths, [None] * 4, spec, tmp_path, log=lambda line: pytest.fail(line))
    assert again.path == first.path
    assert cache_mod.cache_key(paths, [None] * 4, cache_mod.resolution_spec(spec, 32)) != first.path.stem
    assert cache_mod.cache_key(paths[:3], [None] * 3, spec) != first.path.stem
    assert cache_mod.cache_key(paths, ["a", "b", "c", "d"], spec) != first.path.stem


# --- augmentation -----------------------------------------------------------------------------


def test_augmentation_is_seeded_changes_images_and_keeps_shape():
    x = torch.randn(4, 1, SIZE, SIZE)
    a = augment_batch(x, default_augment(SIZE, seed=3))
    b = augment_batch(x, default_augment(SIZE, seed=3))
    c = augment_batch(x, default_augment(SIZE, seed=4))
    assert a.shape == x.shape and type(a) is torch.Tensor
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)


def test_no_flip_by_default():
    names = [type(t).__name__ for t in default_augment(SIZE).transforms]
    assert "RandFlip" not in names and "RandAffine" in names
    assert "RandFlip" in [type(t).__name__ for t in default_augment(SIZE, flip=True).transforms]


# --- schedules and groups ---------------------------------------------------------------------


def test_one_cycle_warms_up_then_anneals_with_inverse_momentum():
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([p], lr=1.0)
    scheduler = one_cycle(optimizer, [1e-2], total_steps=100, pct_start=0.3, div=25.0, final_div=1e4)
    lrs, betas = [], []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        betas.append(optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        scheduler.step()
    peak = int(np.argmax(lrs))
    assert abs(lrs[0] - 1e-2 / 25) < 1e-9 and 28 <= peak <= 31 and abs(max(lrs) - 1e-2) < 1e-6
    assert all(np.diff(lrs[:peak + 1]) >= 0) and all(np.diff(lrs[peak:]) <= 0)
    assert lrs[-1] < 2e-5 and betas[0] == pytest.approx(0.95) and betas[peak] == pytest.approx(0.85, abs=1e-3)


def test_discriminative_lrs_map_onto_layer_groups_early_lowest():
    net = build_network("efficientnet-lite0", 1, 1, SIZE, pretrained=False)
    groups = layer_groups(net)
    lrs = discriminative_lrs(1e-5, 1e-3, len(groups))
    assert lrs == pytest.approx([1e-5, 1e-4, 1e-3])
    optimizer = adamw(groups, lrs, 0.01)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(lrs)
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    assert head(net).weight in groups[-1] and net._conv_stem.weight in groups[0]


# --- training mechanics through the cache ----------------------------------------------------


def tiny_trainer(cfg: TrainConfig, n_findings: int = 1, architecture: str = "efficientnet-lite0") -> tuple[Trainer, Caches, dict]:
    torch.manual_seed(0)
    d = prepare_split(cfg, log=lambda _: None)
    caches = Caches(d.records, d.train_idx + d.val_idx, PreprocessSpec.from_dict(cfg.preprocessing),
                    Path(cfg.cache_dir), log=lambda _: None)
    loss_fn, _ = make_loss(cfg, d.y[d.train_idx], torch.device("cpu"))
    net = build_network(architecture, n_findings, 1, SIZE, pretrained=architecture == "efficientnet-lite0")
    return Trainer(net.to(memory_format=torch.channels_last), loss_fn, torch.device("cpu"),
                   ema=ModelEma(net, cfg.ema) if cfg.ema else None), caches, d


@pytest.mark.parametrize("architecture", ["efficientnet-lite0", "densenet121"])
def test_frozen_phase_keeps_body_weights_and_batchnorm_statistics(dataset, tmp_path, architecture):
    cfg = tiny_config(tmp_path, dataset, epochs_frozen=1, stages=[])
    trainer, caches, d = tiny_trainer(cfg, architecture=architecture)
    net = trainer.net
    freeze_body(net)
    head_name = "_fc" if architecture == "efficientnet-lite0" else "class_layers.out"
    before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith(head_name)}
    head_before = head(net).weight.clone()
    run_phase(trainer, [(48, caches.get(48))], caches.positions(d.train_idx), d.y[d.train_idx],
              [list(head(net).parameters())], [1e-2], cfg, True, torch.Generator().manual_seed(0), lambda _: None,
              "frozen", max_steps=2)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "body weights or BatchNorm statistics changed"
    assert not torch.equal(head_before, head(net).weight)


def test_fine_tune_decreases_the_loss_through_cache_and_augmentation(dataset, tmp_path):
    cfg = tiny_config(tmp_path, dataset, epochs_frozen=0, stages=[[SIZE, 6]], lr=4e-3, val_fraction=0.2)
    trainer, caches, d = tiny_trainer(cfg)
    losses = fine_tune(trainer, caches, d.train_idx, d.y, cfg, lambda _: None)
    assert len(losses) == 6 and np.mean(losses[-2:]) < 0.75 * losses[0], losses


def test_unknown_labels_give_no_gradient_to_their_logit(tmp_path):
    labels = write_dataset(tmp_path / "data", n=24, extra_column=True)
    cfg = tiny_config(tmp_path, labels, findings=["pneumonia", "effusion"], weight_decay=0.0, epochs_frozen=0,
                      stages=[[SIZE, 1]])
    trainer, caches, d = tiny_trainer(cfg, n_findings=2)
    assert np.isnan(d.y[:, 1]).all() and not np.isnan(d.y[:, 0]).any()
    w = head(trainer.net).weight.detach().clone()
    losses = fine_tune(trainer, caches, d.train_idx, d.y, cfg, lambda _: None, max_steps=2)
    w_after = head(trainer.net).weight.detach()
    assert np.isfinite(losses).all()
    assert torch.equal(w[1], w_after[1]) and not torch.equal(w[0], w_after[0])


def test_ema_weights_differ_from_raw_and_are_what_is_saved(dataset, tmp_path):
    cfg = tiny_config(tmp_path, dataset, ema=0.9, epochs_frozen=0, stages=[[SIZE, 1]])
    trainer, caches, d = tiny_trainer(cfg)
    fine_tune(trainer, caches, d.train_idx, d.y, cfg, lambda _: None, max_steps=3)
    assert trainer.ema.updates == 3 and trainer.evaluated is trainer.ema.module
    raw, ema = trainer.net.state_dict(), trainer.ema.module.state_dict()
    assert not torch.equal(raw["_fc.weight"], ema["_fc.weight"])
    saved = torch.load(save_checkpoint(trainer, tmp_path / "best.pt"), weights_only=True)
    assert all(torch.equal(saved[k], ema[k].contiguous()) for k in ema)


def test_densenet121_builds_steps_and_loads_user_weights(dataset, tmp_path):
    net = build_network("densenet121", 2, 1, SIZE, pretrained=False)
    torch.save(net.state_dict(), tmp_path / "dn.pt")
    loaded = build_network("densenet121", 2, 1, SIZE, weights=str(tmp_path / "dn.pt"))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    assert sum(len(g) for g in layer_groups(net)) == len(list(net.parameters()))
    cfg = tiny_config(tmp_path, dataset, architecture="densenet121", epochs_frozen=0, stages=[[SIZE, 1]])
    trainer, caches, d = tiny_trainer(cfg, architecture="densenet121")
    before = trainer.net.features.conv0.weight.detach().clone()
    losses = fine_tune(trainer, caches, d.train_idx, d.y, cfg, lambda _: None, max_steps=1)
    assert np.isfinite(losses).all() and not torch.equal(before, trainer.net.features.conv0.weight)
    with pytest.raises(ValueError, match="not a DenseNet121"):
        build_network("densenet121", 3, 1, SIZE, weights=str(tmp_path / "dn.pt"))


def test_lr_finder_leaves_the_network_unchanged_and_suggests_a_rate():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    x = torch.randn(64, 4)
    y = (x[:, :1] > 0).float()
    before = [p.detach().clone() for p in net.parameters()]

    def batches():
        while True:
            yield x, y

    result = lr_find(net, batches(), torch.nn.functional.binary_cross_entropy_with_logits,
                     [list(net[0].parameters()), list(net[2].parameters())], [0.1, 1.0], end_lr=100.0, steps=80)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert len(result["lrs"]) == len(result["losses"]) >= 20
    assert result["lrs"][0] < result["suggested"] < result["lrs"][-1]


# --- the run folder ---------------------------------------------------------------------------


def test_run_writes_the_run_folder_and_is_reproducible(dataset, tmp_path):
    summaries = []
    for name in ("a", "b"):
        cfg = tiny_config(tmp_path, dataset, out=str(tmp_path / name), lr_find=False)
        summaries.append(run(cfg, log=lambda _: None, max_steps=2))
    a, b = tmp_path / "a", tmp_path / "b"
    for name in ("config.json", "metrics.json", "best.pt", "val_predictions.npz", "curves.png"):
        assert (a / name).is_file(), name
    finder = run(tiny_config(tmp_path, dataset, out=str(tmp_path / "f"), lr_find_only=True), log=lambda _: None)
    assert (tmp_path / "f" / "lr_find.png").is_file() and finder["lr_find"]["suggested"] > 0
    assert json.loads((tmp_path / "f" / "lr_find.json").read_text())["suggested"] == finder["lr_find"]["suggested"]
    config = json.loads((a / "config.json").read_text())
    for key in ("preprocessing", "findings", "size", "seed", "val_fraction", "split", "recipe", "epochs_frozen", "epochs",
                "size_frozen", "batch_size", "lr", "lr_mult", "weight_decay", "limit", "device", "code_version"):
        assert key in config, key
    assert config["epochs"] == 2 and config["findings"] == ["pneumonia"] and config["pos_weight"] == "none"
    metrics = json.loads((a / "metrics.json").read_text())
    assert [e["phase"] for e in metrics["epochs"]] == ["frozen", "unfrozen", "unfrozen"]
    assert [e["size"] for e in metrics["epochs"]] == [48, 48, SIZE]
    pa, pb = np.load(a / "val_predictions.npz"), np.load(b / "val_predictions.npz")
    np.testing.assert_array_equal(pa["logits"], pb["logits"])  # same seed, same numbers
    assert len(pa["rows"]) == len(pa["labels"]) == config["split"]["validation"]["n_images"]
    assert summaries[0]["best"]["val_auroc"] == max(e["val_auroc"] for e in metrics["epochs"])
    net = network_from_config(config)
    net.load_state_dict(torch.load(a / "best.pt", weights_only=True))  # the export's way back in
    again = load_config(a / "config.json")  # a run's config trains again
    assert (again.seed, again.stages, again.lr) == (config["seed"], config["stages"], config["lr"])


def test_split_shares_no_patient(dataset, tmp_path):
    d = prepare_split(tiny_config(tmp_path, dataset), log=lambda _: None)
    train = {d.records[i].patient_id for i in d.train_idx}
    val = {d.records[i].patient_id for i in d.val_idx}
    assert train and val and not train & val


def test_config_file_and_overrides(tmp_path):
    (tmp_path / "run.toml").write_text('out = "runs/x"\nstages = [[128, 1], [224, 3]]\nema = 0.99\n')
    cfg = load_config(tmp_path / "run.toml", seed=7, ema=None)
    assert cfg.stages == [[128, 1], [224, 3]] and cfg.epochs == 4 and cfg.ema == 0.99 and cfg.seed == 7
    (tmp_path / "bad.json").write_text('{"stagez": []}')
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(tmp_path / "bad.json")


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, "benchmarks/bench_train_gpu.py", "--smoke", "--json", str(out)], cwd=repo, check=True,
                   capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["smoke"] and result["throughput"][0]["pure_step_images_per_s"] > 0
    assert result["throughput"][0]["ratio_full_over_pure"] > 0 and result["time_to_auroc"]["wall_seconds"] > 0
