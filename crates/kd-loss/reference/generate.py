"""Golden values for the kd-loss crate.

Computes every divergence and reduction of `kd-loss` with PyTorch autodiff in float64 and, where
TRL has the same loss, with TRL's own `GKDTrainer.generalized_jsd_loss` in float32; both with
the gradient with respect to the student logits. Writes `golden.json` beside this file.

    python -m venv .venv && .venv/bin/pip install -r requirements.txt
    .venv/bin/python generate.py

Conventions (the same as the Rust crate):
- logits are [batch, seq, vocab]; a position is kept where mask == 1 (labels != -100 for TRL);
- log p = log_softmax(student / T), log q = log_softmax(teacher[..., :vocab] / T);
- FKL = KL(q||p), RKL = KL(p||q), JSD(b) = b KL(q||m) + (1-b) KL(p||m), m = b q + (1-b) p,
  with b = 0 -> FKL and b = 1 -> RKL (TRL's special cases); no T^2 unless "t_squared";
- reductions: sum; token_mean = sum / max(kept, 1); items = sum / n;
  per_sequence_mean = mean over sequences with >= 1 kept position of their token mean;
- sparse (top-k cached teacher) with the tail-bucket rule: both distributions are coarsened to
  the teacher's k ids plus one bucket holding the rest of the mass, and the divergence is taken
  between the coarsened distributions; the cached log-probs are used as given (computed at the
  same temperature).
"""

import json
import math
import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from trl.experimental.gkd import GKDTrainer  # noqa: E402

SEED = 20240604
BATCH, SEQ, VOCAB, TEACHER_VOCAB = 2, 5, 13, 16
TOP_K = 4
ITEMS = 11.0
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TEMPERATURES = [1.0, 2.0, 0.5]
REDUCTIONS = ["sum", "token_mean", "per_sequence_mean", "items"]


def divergence(ls, lt, kind, beta):
    """Per-position divergence [..] from log-probabilities [.., vocab] (float64)."""
    p, q = ls.exp(), lt.exp()
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):
        return torch.xlogy(q, q).sum(-1) - (q * ls).sum(-1)
    if kind == "rkl" or (kind == "jsd" and beta == 1.0):
        return (p * (ls - lt)).sum(-1)
    lm = torch.logsumexp(torch.stack([ls + math.log1p(-beta), lt + math.log(beta)]), 0)
    return beta * (q * (lt - lm)).sum(-1) + (1 - beta) * (p * (ls - lm)).sum(-1)


def reduce(per_pos, mask, reduction):
    """per_pos, mask: [batch, seq] -> scalar."""
    kept = per_pos * mask
    if reduction == "sum":
        return kept.sum()
    if reduction == "token_mean":
        return kept.sum() / mask.sum().clamp_min(1)
    if reduction == "items":
        return kept.sum() / ITEMS
    counts = mask.sum(1)
    per_seq = kept.sum(1) / counts.clamp_min(1)
    return per_seq.sum() / (counts > 0).sum().clamp_min(1)


def flat(t):
    return [float(f"{x:.9g}") for x in t.detach().reshape(-1).tolist()]


def torch_kd(student, teacher, mask, kind, beta, temperature, t_squared, reduction):
    s = student.clone().double().requires_grad_(True)
    ls = F.log_softmax(s / temperature, -1)
    lt = F.log_softmax(teacher[..., :VOCAB].double() / temperature, -1)
    loss = reduce(divergence(ls, lt, kind, beta), mask.double(), reduction)
    if t_squared:
        loss = loss * temperature**2
    loss.backward()
    return loss.item(), s.grad


def trl_kd(student, teacher, labels, beta, temperature, reduction):
    s = student.clone().float().requires_grad_(True)
    kwargs = {}
    if reduction == "sum":
        kwargs["reduction"] = "sum"
    elif reduction == "items":
        kwargs["num_items_in_batch"] = ITEMS
    loss = GKDTrainer.generalized_jsd_loss(
        s, teacher[..., :VOCAB].float(), labels=labels, beta=beta, temperature=temperature,
        **kwargs,
    )
    loss.backward()
    return loss.item(), s.grad


def torch_ce(logits, labels, reduction):
    s = logits.clone().double().requires_grad_(True)
    mask = (labels != -100).double()
    nll = F.cross_entropy(
        s.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).reshape(BATCH, SEQ)
    loss = reduce(nll, mask, reduction)
    loss.backward()
    return loss.item(), s.grad


def torch_sparse(student, teacher, mask, kind, beta, temperature, reduction):
    """Tail-bucket rule over the teacher's top-k at temperature T."""
    lt_full = F.log_softmax(teacher[..., :VOCAB].double() / temperature, -1)
    top_lp, top_ids = lt_full.topk(TOP_K, -1)
    s = student.clone().double().requires_grad_(True)
    ls_full = F.log_softmax(s / temperature, -1)
    ls_top = ls_full.gather(-1, top_ids)
    ls_tail = torch.log1p(-ls_top.exp().sum(-1, keepdim=True).clamp_max(1.0))
    lt_tail = torch.log1p(-top_lp.exp().sum(-1, keepdim=True).clamp_max(1.0))
    ls = torch.cat([ls_top, ls_tail], -1)
    lt = torch.cat([top_lp, lt_tail], -1)
    loss = reduce(divergence(ls, lt, kind, beta), mask.double(), reduction)
    loss.backward()
    return loss.item(), s.grad, top_ids, top_lp


def main():
    gen = torch.Generator().manual_seed(SEED)
    student = torch.randn(BATCH, SEQ, VOCAB, generator=gen, dtype=torch.float64) * 2.5
    teacher = torch.randn(BATCH, SEQ, TEACHER_VOCAB, generator=gen, dtype=torch.float64) * 2.5
    # Keep the teacher's padding columns irrelevant but present: they are sliced off.
    student = student.float().double()  # values exactly representable in f32
    teacher = teacher.float().double()
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 0, 1]], dtype=torch.int64)
    # Second mask: the first sequence fully masked (per-sequence mean must skip it).
    mask_empty = torch.tensor([[0, 0, 0, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.int64)
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)

    cases = []
    for mask_name, m in [("mask", mask), ("mask_empty", mask_empty)]:
        labels = torch.where(m.bool(), targets, torch.full_like(targets, -100))
        for temperature in TEMPERATURES:
            for kind, beta in [("fkl", None), ("rkl", None)] + [("jsd", b) for b in BETAS]:
                for reduction in REDUCTIONS:
                    if mask_name == "mask_empty" and temperature != 1.0:
                        continue
                    for t_squared in [False, True]:
                        if t_squared and temperature != 2.0:
                            continue
                        value, grad = torch_kd(
                            student, teacher, m, kind, beta, temperature, t_squared, reduction
                        )
                        case = {
                            "loss": "kd", "mask": mask_name, "divergence": kind, "beta": beta,
                            "temperature": temperature, "t_squared": t_squared,
                            "reduction": reduction, "value": value, "grad": flat(grad),
                        }
                        if reduction != "per_sequence_mean" and not t_squared:
                            trl_beta = {"fkl": 0.0, "rkl": 1.0}.get(kind, beta)
                            tv, tg = trl_kd(student, teacher, labels, trl_beta, temperature, reduction)
                            case["trl_value"] = tv
                            case["trl_grad"] = flat(tg)
                        cases.append(case)
            if temperature == 1.0:
                for reduction in REDUCTIONS:
                    value, grad = torch_ce(student, labels, reduction)
                    cases.append({"loss": "ce", "mask": mask_name, "reduction": reduction,
                                  "value": value, "grad": flat(grad)})

    sparse = []
    for temperature in [1.0, 2.0]:
        for kind, beta in [("fkl", None), ("rkl", None), ("jsd", 0.5)]:
            for reduction in ["sum", "token_mean"]:
                value, grad, ids, lps = torch_sparse(
                    student, teacher, mask, kind, beta, temperature, reduction
                )
                sparse.append({"divergence": kind, "beta": beta, "temperature": temperature,
                               "reduction": reduction, "value": value, "grad": flat(grad),
                               "top_ids": ids.reshape(-1).tolist(), "top_logprobs": flat(lps)})

    # Hand-checkable: student [0, 0, 0], teacher [2, 0, 0], one position, no T^2.
    hand = []
    s1 = torch.zeros(1, 1, 3, dtype=torch.float64)
    t1 = torch.tensor([[[2.0, 0.0, 0.0]]], dtype=torch.float64)
    for temperature in [1.0, 2.0]:
        for kind, beta in [("rkl", None), ("fkl", None), ("jsd", 0.5)]:
            ls = F.log_softmax(s1 / temperature, -1)
            lt = F.log_softmax(t1 / temperature, -1)
            trl_beta = {"fkl": 0.0, "rkl": 1.0}.get(kind, beta)
            trl = GKDTrainer.generalized_jsd_loss(
                s1.float(), t1.float(), beta=trl_beta, temperature=temperature
            ).item()
            hand.append({"divergence": kind, "beta": beta, "temperature": temperature,
                         "value": divergence(ls, lt, kind, beta).item(), "trl_value": trl})

    out = {
        "generator": "crates/kd-loss/reference/generate.py",
        "torch": torch.__version__,
        "trl": __import__("trl").__version__,
        "seed": SEED, "batch": BATCH, "seq": SEQ, "vocab": VOCAB,
        "teacher_vocab": TEACHER_VOCAB, "items": ITEMS, "top_k": TOP_K,
        "student": flat(student), "teacher": flat(teacher),
        "masks": {"mask": mask.reshape(-1).tolist(), "mask_empty": mask_empty.reshape(-1).tolist()},
        "targets": targets.reshape(-1).tolist(),
        "cases": cases, "sparse": sparse, "hand": hand,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print(f"wrote {path}: {len(cases)} cases, {len(sparse)} sparse, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
