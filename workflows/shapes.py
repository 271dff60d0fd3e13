"""What a model is made of, without loading it: parameter counts, the largest layer (what DeepSpeed ZeRO-3 gathers at
once), and the dimensions the memory formulas need. For `thinkbroad plan`.

From a local model folder: config.json for the dimensions and the safetensors headers (the first bytes of each file)
for the exact parameter count. Without the folder (the weights live on the cluster's shared storage, not where a
user plans): from the same config.json fields given under `plan.models.<name>` in the run config, counted with the
formulas below (checked against the transformers classes built on the meta device in tests/test_plan.py).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DECODERS = ("llama", "mistral", "qwen2", "qwen3")
ENCODERS = ("bert", "roberta", "xlm-roberta")
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


class ShapeError(ValueError):
    """A model whose architecture the planner cannot read; the message names the model, the key and the fix."""


@dataclass(frozen=True)
class ModelShape:
    name: str  # the config value (path or built-in name)
    source: str  # where the numbers came from, said in the plan
    model_type: str
    params: int
    largest_layer: int  # the most parameters one module holds itself (DeepSpeed's "largest layer")
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype: str  # the checkpoint's dtype (config.json `dtype` / `torch_dtype`)
    qk_norm: bool = False
    lookup_params: int = 0  # input embeddings: looked up, not multiplied (an untied decoder's; an encoder's all)
    # per layer: linear module name -> (in_features, out_features); what LoRA's target_modules pick from
    linears: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def decoder(self) -> bool:
        return self.model_type in DECODERS

    @property
    def matmul_params(self) -> int:
        """The parameters a token multiplies through (2 FLOPs each forward): all but the embedding lookups."""
        return self.params - self.lookup_params

    def lora_params(self, r: int, targets: list[str] | str) -> int:
        """Trainable parameters of LoRA rank r on `targets` ("all-linear": every linear layer but the LM head, as PEFT)."""
        chosen = self.linears if targets == "all-linear" else {k: v for k, v in self.linears.items() if k in targets}
        return self.layers * sum(r * (i + o) for i, o in chosen.values())

    def kv_bytes_per_token(self, dtype_bytes: int, tensor_parallel: int = 1) -> int:
        """vLLM's KV cache per token on one GPU: 2 (K and V) x layers x KV heads (split over tensor parallel ranks,
        at least one each) x head dim x dtype bytes."""
        return 2 * self.layers * max(1, self.kv_heads // tensor_parallel) * self.head_dim * dtype_bytes

    def activation_bytes_per_token_layer(self, dtype_bytes: int, seq_len: int) -> int:
        """What one layer keeps for backward per token. Decoder (Llama-style, flash/SDPA attention, no s^2 term): the
        two norms' inputs and outputs (4h), q and the attention output (2 x heads x d), k and v (2 x KV heads x d),
        the MLP's gate, activation, up and product (4 x intermediate), plus q/k norm inputs where the model has
        them. Encoder (BERT): Korthikanti et al. 2022, 34h + 5 x heads x s in 16-bit, scaled to the dtype."""
        h, d = self.hidden, self.head_dim
        if self.decoder:
            n = 4 * h + 2 * self.heads * d + 2 * self.kv_heads * d + 4 * self.intermediate
            if self.qk_norm:
                n += self.heads * d + self.kv_heads * d
            return n * dtype_bytes
        return (34 * h + 5 * self.heads * seq_len) * dtype_bytes // 2


REQUIRED = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def shape_from_config(name: str, cfg: dict[str, Any], source: str, where: str, drop_pooler: bool = False) -> ModelShape:
    """config.json fields -> ModelShape with the parameters counted by formula. `where` names the config's origin
    in errors (a file, or plan.models.<name>)."""
    cfg = cfg.get("text_config") or cfg
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ShapeError(f"{where}: missing {', '.join(missing)}; copy these fields from the model's published config.json")
    mt = cfg["model_type"]
    h, layers, heads, inter, vocab = (int(cfg[k]) for k in REQUIRED[1:])
    kv = int(cfg.get("num_key_value_heads") or heads)
    d = int(cfg.get("head_dim") or h // heads)
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    if mt in DECODERS:
        attn_bias = bool(cfg.get("attention_bias", False))
        qkv_bias = mt == "qwen2" or attn_bias  # Qwen2 always has q/k/v biases
        linears = {"q_proj": (h, heads * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d), "o_proj": (heads * d, h),
                   "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
        biases = (heads * d + 2 * kv * d if qkv_bias else 0) + (h if attn_bias and mt != "qwen2" else 0)
        if cfg.get("mlp_bias"):
            biases += 2 * inter + h
        qk_norm = mt == "qwen3"
        per_layer = sum(i * o for i, o in linears.values()) + biases + 2 * h + (2 * d if qk_norm else 0)
        tied = bool(cfg.get("tie_word_embeddings", False))  # these config classes default to untied
        params = vocab * h * (1 if tied else 2) + layers * per_layer + h
        largest = max(vocab * h, max(i * o for i, o in linears.values()))
        return ModelShape(name, source, mt, params, largest, layers, h, heads, kv, d, inter, vocab, dtype, qk_norm,
                          0 if tied else vocab * h, linears)
    if mt in ENCODERS:
        positions = int(cfg.get("max_position_embeddings", 512))
        types = int(cfg.get("type_vocab_size", 2))
        embeddings = (vocab + positions + types) * h + 2 * h
        per_layer = 4 * (h * h + h) + 2 * h + (h * inter + inter) + (inter * h + h) + 2 * h
        pooler = 0 if drop_pooler else h * h + h
        linears = {"query": (h, h), "key": (h, h), "value": (h, h), "dense": (h, h)}
        return ModelShape(name, source, mt, embeddings + layers * per_layer + pooler, max(vocab * h, h * inter), layers, h,
                          heads, heads, d, inter, vocab, dtype, False, embeddings, linears)
    raise ShapeError(f"{where}: model_type {mt!r} is not one the planner can count ({', '.join(DECODERS + ENCODERS)}); "
                     "plan with a model of one of these families, or add its formula to workflows/shapes.py")


def safetensors_counts(folder: Path, skip_prefixes: tuple[str, ...] = ()) -> tuple[int, int]:
    """(total parameters, largest module's own parameters) from the headers of every *.safetensors file in `folder`:
    8 bytes of header length, then a JSON header of tensor name -> shape. No weights are read."""
    total, modules = 0, {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for tensor, meta in header.items():
            if tensor == "__metadata__" or any(p in tensor for p in skip_prefixes):
                continue
            n = 1
            for dim in meta["shape"]:
                n *= dim
            total += n
            module = tensor.rsplit(".", 1)[0]
            modules[module] = modules.get(module, 0) + n
    return total, max(modules.values(), default=0)


def model_shape(name: str, folder: str | Path | None, plan_models: dict[str, dict], drop_pooler: bool = False) -> ModelShape:
    """The shape of the model a config names: from `folder` (config.json + safetensors headers) when it is on this
    machine, else from `plan.models[name]`; ShapeError naming both places when neither has it."""
    if folder is not None and (Path(folder) / "config.json").exists():
        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        shape = shape_from_config(name, cfg, f"folder {folder}", str(folder / "config.json"), drop_pooler)
        total, largest = safetensors_counts(folder, ("pooler.",) if drop_pooler else ())
        if total:  # the exact count of what is loaded; the formula stands in for a folder without weights
            return ModelShape(**{**shape.__dict__, "params": total, "largest_layer": largest,
                                 "source": f"folder {folder} (config.json, safetensors headers)"})
        return shape
    if name in plan_models:
        return shape_from_config(name, plan_models[name], "plan.models (config.json fields; the folder is not on this machine)",
                                 f"plan.models.{name}", drop_pooler)
    raise ShapeError(f"model {name!r} is not a folder with config.json on this machine (a run needs it there: give the "
                     "path of a local Hugging Face model folder) and plan.models has no entry to plan it from elsewhere: add "
                     f"plan.models: {{{name!r}: {{...}}}} with the fields of its config.json ({', '.join(REQUIRED)}, "
                     "num_key_value_heads, head_dim, tie_word_embeddings, torch_dtype)")
