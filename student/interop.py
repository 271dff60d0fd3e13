"""The vanilla student as a sentence-transformers `CrossEncoder`: `CrossEncoder(folder)` loads a vanilla student's
folder and gives the logits of `LRKDStudent.forward` (tests/test_interop.py: within 1e-5 on bundled pairs).

Why not `AutoModelForSequenceClassification` (what a CrossEncoder loads from a plain Hugging Face folder): our head
is one Linear layer on the last hidden state of [CLS]; BertForSequenceClassification puts BERT's pooler (a dense
layer and tanh) in front of its classifier, and no pooler weights make tanh the identity. So the folder carries a
sentence-transformers module layout instead, the library's own way to describe such a model, read without
`trust_remote_code` and with safetensors only:

  modules.json                        Transformer (the encoder) -> Pooling (cls) -> Dense (identity, "scores")
  config_sentence_transformers.json   model_type CrossEncoder, identity activation (predict returns the logits)
  sentence_bert_config.json           the Transformer module: loads the encoder from this folder's
                                      model.safetensors, renaming our `encoder.` keys to the backbone's own
                                      (transformers' `key_mapping`), max length = the student's
  1_Pooling/config.json               the first token's state (with right padding, the [CLS] state our model reads)
  2_Dense/config.json, model.safetensors   our classifier's weight and bias, written from the same state dict

The encoder weights are not duplicated: the Transformer module reads the student's own model.safetensors; the
classifier and centroid tensors there are reported by transformers as unexpected keys of the encoder (the
classifier is loaded by 2_Dense, the centroids serve the LRKD attribution only). Imports neither
sentence-transformers nor transformers: the training workers write these files with json and safetensors.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

ST_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "1_Pooling", "2_Dense")
IDENTITY = "torch.nn.modules.linear.Identity"


def supported(model, tokenizer) -> str | None:
    """None when the student can be written as a CrossEncoder, else why not (for the model card)."""
    if model.extractor is not None:
        return (f"its latent reasoning extractor ({model.cfg.extractor}) sits between the encoder and the classifier "
                "and has no counterpart among sentence-transformers' modules")
    if tokenizer is None:
        return "the folder has no tokenizer"
    if getattr(tokenizer, "padding_side", "right") != "right":
        return "its tokenizer pads on the left, where the first token is not [CLS]"
    return None


def write_cross_encoder_files(model, path: str | Path, tokenizer) -> bool:
    """Write the sentence-transformers layout next to a vanilla student's own files in `path` (after its
    model.safetensors). Returns False (and removes any old layout) when `supported` says no."""
    import shutil

    from safetensors.torch import save_file

    path = Path(path)
    if supported(model, tokenizer) is not None:
        for name in ST_FILES:
            target = path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        return False
    hidden, labels = model.classifier.in_features, model.classifier.out_features
    model_kwargs: dict = {"key_mapping": {r"^encoder\.": ""}}
    processor_kwargs: dict = {"model_max_length": model.cfg.max_length}
    if not model.cfg.segment_ids and "token_type_ids" in tokenizer.model_input_names:
        # the student's forward does not hand segment ids to its encoder (StudentConfig.segment_ids, off in students
        # saved before 2026-12-06): the CrossEncoder's tokenizer must not produce them either, or the encoder would
        # add segment-1 embeddings
        processor_kwargs["model_input_names"] = [n for n in tokenizer.model_input_names if n != "token_type_ids"]
    if "add_pooling_layer" in inspect.signature(type(model.encoder).__init__).parameters:
        model_kwargs["add_pooling_layer"] = False  # the student has no pooler (student/model.py): none to initialise
    files = {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling",
             "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.base.modules.dense.Dense"}],
        "config_sentence_transformers.json": {"model_type": "CrossEncoder", "activation_fn": IDENTITY, "prompts": {},
                                              "default_prompt_name": None},
        "sentence_bert_config.json": {
            "transformer_task": "feature-extraction",
            "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
            "module_output_name": "token_embeddings", "model_kwargs": model_kwargs,
            "processor_kwargs": processor_kwargs},
        "1_Pooling/config.json": {"embedding_dimension": hidden, "pooling_mode": "cls", "include_prompt": True},
        "2_Dense/config.json": {"in_features": hidden, "out_features": labels, "bias": True, "activation_function": IDENTITY,
                                "module_input_name": "sentence_embedding", "module_output_name": "scores"},
    }
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(json.dumps(content, indent=2) + "\n")
    save_file({"linear.weight": model.classifier.weight.detach().contiguous().cpu(),
               "linear.bias": model.classifier.bias.detach().contiguous().cpu()},
              str(path / "2_Dense" / "model.safetensors"))
    return True
