"""A network's weights as plain arrays: ``weights.npz`` in a bundle, so training can restart from it.

A bundle is untrusted input, so the weights are a numpy ``.npz`` of the state dict read with
``allow_pickle=False`` (no pickle, no code), and pinned by sha256 in the manifest like every file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WEIGHTS_FILE = "weights.npz"


def save_weights(net, path: str | Path) -> Path:
    """Write ``net.state_dict()`` (torch) as an uncompressed ``.npz`` of arrays; returns the path."""
    arrays = {key: value.detach().cpu().contiguous().numpy() for key, value in net.state_dict().items()}
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return Path(path)


def load_weights(path: str | Path) -> dict:
    """The state dict (name -> torch tensor) stored by ``save_weights``; never unpickles."""
    import torch

    with np.load(path, allow_pickle=False) as stored:
        return {key: torch.from_numpy(np.array(stored[key])) for key in stored.files}
