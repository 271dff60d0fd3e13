"""A student's training state in a Ray Train checkpoint, without pickle: weights and the optimizer's tensors as
safetensors, the rest (which job, where in which epoch, history, the epoch's running sums) as JSON.

Random state needs no saving: every stream is seeded by (seed, epoch, step, rank) (student/stream.py), so a resumed
run that restores the weights, the optimizer and the data position continues exactly where the killed one stood."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

STATE, WEIGHTS, OPTIMIZER = "state.json", "model.safetensors", "optimizer.safetensors"


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimizer's per-parameter state as named tensors, and its param groups (hyper-parameters) as JSON."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def save(folder: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, WEIGHTS))
    tensors, groups = optimizer_tensors(opt)
    save_file(tensors, os.path.join(folder, OPTIMIZER))
    (folder / STATE).write_text(json.dumps(state | {"param_groups": groups}))


def load(folder: str | Path) -> dict:
    """{"weights", "optimizer" (tensors), "param_groups", and the saved state's keys}."""
    from safetensors.torch import load_file

    folder = Path(folder)
    state = json.loads((folder / STATE).read_text())
    state["weights"] = load_file(os.path.join(folder, WEIGHTS))
    opt = folder / OPTIMIZER
    state["optimizer"] = load_file(str(opt)) if opt.exists() else None
    return state
