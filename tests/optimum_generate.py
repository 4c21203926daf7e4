"""Generate with optimum's ORTModel classes, for the tests: run by optimum-onnx's own
interpreter (``.venv-optimum/bin/python``: it pins transformers 4.57), never imported by the
test suite.

Reads a JSON list of {"src": folder, "big": folder} on stdin; for each pair, loads both folders
with ``ORTModelForSeq2SeqLM`` (an encoder-decoder's ``config.json``) or
``ORTModelForCausalLM``, once with the merged decoder (when the folder has one) and once with
the separate decoders (when it has them), generates ``TOKENS`` greedy tokens from fixed
prompts (a padded batch of two) and prints one JSON object per pair: for each way of loading,
whether the generated sequences are identical, the first-step logits' max |difference| relative
to max |source logits|, and the tokens; plain greedy, and greedy with no token repeated
(``distinct``), whose steps depend on the logits' ranking, not only their maximum.  A folder optimum cannot load or run gives an
"error" entry instead (the test says which).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

TOKENS = 24


def _load(path: str, merged: bool | None):
    from optimum.onnxruntime import ORTModelForCausalLM, ORTModelForSeq2SeqLM

    cfg = json.load(open(os.path.join(path, "config.json")))
    cls = ORTModelForSeq2SeqLM if cfg.get("is_encoder_decoder") else ORTModelForCausalLM
    kw = {} if merged is None else {"use_merged": merged}
    return cls.from_pretrained(path, **kw)


def _ways(path: str) -> list:
    files = set(os.listdir(path))
    ways = []
    if "decoder_model_merged.onnx" in files:
        ways.append(("merged", True))
    if "decoder_with_past_model.onnx" in files or "decoder_model.onnx" in files:
        ways.append(("unmerged", False))
    return ways or [("model", None)]


def _generate(path: str, merged, prompts, distinct: bool):
    """Greedy generation; ``distinct``: no token twice in a row of the output
    (``no_repeat_ngram_size=1``): each step then picks by the ranking of the logits, not only
    their maximum, which a cache that is slightly wrong changes."""
    import torch

    model = _load(path, merged)
    ids, mask = prompts
    out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False,
                         num_beams=1, output_logits=True, return_dict_in_generate=True,
                         **({"no_repeat_ngram_size": 1} if distinct else {}))
    return out.sequences.numpy(), out.logits[0].numpy()


def _prompts(cfg: dict):
    vocab = int(cfg.get("vocab_size") or 100)
    ids = [[(7 * k + 3) % (vocab - 3) + 3 for k in range(7)],
           [(11 * k + 5) % (vocab - 3) + 3 for k in range(7)]]
    mask = [[1] * 7, [1] * 5 + [0] * 2]
    return ids, mask


def compare(src: str, big: str) -> dict:
    import numpy as np

    cfg = json.load(open(os.path.join(src, "config.json")))
    prompts = _prompts(cfg)
    result = {"src": src, "big": big}
    for way, merged in _ways(src):
        for distinct in (False, True):
            key = way + (", distinct" if distinct else "")
            try:
                seq_a, log_a = _generate(src, merged, prompts, distinct)
                seq_b, log_b = _generate(big, merged, prompts, distinct)
            except Exception as exc:  # reported, the test decides
                result[key] = {"error": f"{type(exc).__name__}: {exc}",
                               "trace": traceback.format_exc()[-2000:]}
                continue
            ref = float(np.abs(log_a).max())
            # an encoder-decoder's sequences start with the decoder start token
            prompt = 1 if cfg.get("is_encoder_decoder") else len(prompts[0][0])
            result[key] = {"same_tokens": bool(np.array_equal(seq_a, seq_b)),
                           "new_tokens": int(seq_a.shape[-1] - prompt),
                           "logits_rel": float(np.abs(log_a - log_b).max() / ref) if ref
                           else 0.0,
                           "tokens_src": seq_a.tolist(), "tokens_big": seq_b.tolist()}
    return result


def main() -> int:
    pairs = json.load(sys.stdin)
    for p in pairs:
        print(json.dumps(compare(p["src"], p["big"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
