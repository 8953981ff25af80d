"""Builds the tiny Qwen3 / Qwen2 parity fixtures of kd-qwen, or checks an exported folder.

    python generate.py [--out ../tests/fixtures]   # (re)write the fixtures, seeded
    python generate.py --check DIR [--family qwen3] # load DIR with transformers, compare logits

Each family gets a checkpoint folder written by `save_pretrained` (Qwen3: one tied
model.safetensors; Qwen2: sharded, with model.safetensors.index.json), a bf16 copy of the same
weights, and `reference.safetensors` with:

- `ids_{i}`            the i-th prompt (int64, unpadded);
- `hidden_{i}`         last hidden state (after the final norm) of prompt i alone, [len, hidden];
- `logits_{i}`         logits of prompt i alone, [len, vocab];
- `logits_right`, `logits_left`, `mask_right`, `mask_left`: the padded batch of all prompts
  (ids padded with PAD_ID, position ids from the attention mask as `generate` derives them);
- `logits_left_bf16w`  the left-padded batch through the bf16 copy's weights upcast to f32;
- `greedy`             8 greedy tokens per prompt, left-padded batch with the KV cache.

All forwards run in float32 with eager attention.
"""

import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file, load_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

SEED = 20240601
PAD_ID = 0
PROMPTS = [
    [5, 17, 42, 9, 63, 88, 21],
    [3, 71, 30, 12, 50],
    [44, 8, 91],
]
NEW_TOKENS = 8
VOCAB = 96


def configs():
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD_ID,
    )
    # Qwen3: head_dim 16 stated, unlike hidden / heads = 8; tied head like Qwen3-0.6B / 4B.
    qwen3 = Qwen3Config(head_dim=16, tie_word_embeddings=True, rope_theta=1_000_000.0, **common)
    # Qwen2: head_dim derived (8), q/k/v bias, untied head, theta 1e4 like R1-Distill-Qwen-1.5B.
    qwen2 = Qwen2Config(tie_word_embeddings=False, rope_theta=10_000.0, **common)
    return {"qwen3": qwen3, "qwen2": qwen2}


def randomise(model, gen):
    """Weights large enough that logits are far from uniform; norm scales away from 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[1]
                p.copy_(1.5 * torch.randn(p.shape, generator=gen) / fan_in**0.5)


def padded(prompts, left):
    width = max(len(p) for p in prompts)
    ids, mask = [], []
    for p in prompts:
        pad = [PAD_ID] * (width - len(p))
        m0, m1 = [0] * len(pad), [1] * len(p)
        ids.append(pad + p if left else p + pad)
        mask.append(m0 + m1 if left else m1 + m0)
    return torch.tensor(ids), torch.tensor(mask)


def batch_logits(model, ids, mask):
    # Positions from the mask, as `generate` derives them (pad positions get 1; never read).
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def max_diff_on_mask(a, b, mask):
    return (a - b).abs()[mask.bool()].max().item()


def build(family, config, out):
    gen = torch.Generator().manual_seed(SEED + (0 if family == "qwen3" else 1))
    torch.manual_seed(SEED)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomise(model, gen)
    folder = os.path.join(out, family)
    shutil.rmtree(folder, ignore_errors=True)
    # Qwen2 is written sharded so that the index.json path is tested on transformers' own output.
    shard = "40KB" if family == "qwen2" else "50GB"
    model.save_pretrained(folder, max_shard_size=shard)

    ref = {}
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            ids = torch.tensor([p])
            o = model(input_ids=ids, output_hidden_states=True)
            ref[f"ids_{i}"] = ids[0].to(torch.int64)
            ref[f"logits_{i}"] = o.logits[0]
            ref[f"hidden_{i}"] = o.hidden_states[-1][0]
    for side, left in (("right", False), ("left", True)):
        ids, mask = padded(PROMPTS, left)
        logits = batch_logits(model, ids, mask)
        ref[f"logits_{side}"] = logits
        ref[f"mask_{side}"] = mask.to(torch.int64)
        # Each padded row must reproduce the row alone (checked here, once, in PyTorch).
        for i, p in enumerate(PROMPTS):
            row = logits[i][mask[i].bool()]
            d = (row - ref[f"logits_{i}"]).abs().max().item()
            assert d < 1e-4, (family, side, i, d)

    ids, mask = padded(PROMPTS, left=True)
    with torch.no_grad():
        out_ids = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=PAD_ID, eos_token_id=None, use_cache=True,
        )
    ref["greedy"] = out_ids[:, ids.shape[1]:].to(torch.int64).contiguous()

    # The bf16 copy, and the logits of its weights upcast back to f32.
    bf16_folder = folder + "-bf16"
    shutil.rmtree(bf16_folder, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(bf16_folder)
    # Reload rather than `.to(float32)`: the cast above also rounded the RoPE `inv_freq`
    # buffer to bf16, which a fresh load recomputes in f32.
    upcast = AutoModelForCausalLM.from_pretrained(bf16_folder, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    ids, mask = padded(PROMPTS, left=True)
    bf = batch_logits(upcast, ids, mask)
    ref["logits_left_bf16w"] = bf
    print(f"{family}: bf16-weight logits vs f32, max abs on real tokens: "
          f"{max_diff_on_mask(bf, ref['logits_left'], mask):.4g}; "
          f"logit std {ref['logits_left'].std().item():.3g}")
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(folder, "reference.safetensors"))


def check(folder, family, fixtures):
    ref = load_file(os.path.join(fixtures, family, "reference.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    worst = 0.0
    for side in ("right", "left"):
        ids, mask = padded(PROMPTS, left=(side == "left"))
        logits = batch_logits(model, ids, mask)
        d = max_diff_on_mask(logits, ref[f"logits_{side}"], mask)
        print(f"{folder}: {side}-padded logits vs fixture reference, max abs {d:.3g}")
        worst = max(worst, d)
    return worst


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures"))
    ap.add_argument("--check", metavar="DIR", help="exported folder to load and compare")
    ap.add_argument("--family", default=None, help="fixture family of --check (from config)")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    if args.check:
        family = args.family or json.load(open(os.path.join(args.check, "config.json")))["model_type"]
        worst = check(args.check, family, args.out)
        sys.exit(0 if worst <= args.tol else 1)
    os.makedirs(args.out, exist_ok=True)
    for family, config in configs().items():
        build(family, config, args.out)


if __name__ == "__main__":
    main()
