"""The MTP training recipe: self-distillation of a frozen trunk into MTP layers.

Acceptance in speculative decoding means *agreeing with the trunk*, so the targets
are the trunk's own distributions, not the data's next tokens: the depth-``d``
head at position ``i`` predicts token ``i+d+1`` and learns the trunk's softmax at
position ``i+d`` (loss: KL(trunk || head), i.e. soft-target cross-entropy minus a constant). Depths
``1..depths`` are trained together (with one layer, the same layer chained).

Data, in every batch: trunk-written chats (the trunk answers user requests in its
own chat template, so the heads see what they will draft at run time) and plain
corpus text. The requests come from the corpus and from the trunk itself
(``data.self_instruct_requests``: code, explanations and other general requests the
corpus lacks). Everything is seeded; the run records its settings, data, loss curve
and greedy acceptance, on the held-out prompts and on the bench prompts (general
chat, stories and code, never trained on), in ``training_log.json``.

Outputs in ``out_dir``: ``mtp.safetensors`` (HF names ``model.layers.{N+i}.*``,
float16, no ``shared_head.head``: the trunk's tied output head is used),
``training_log.json`` and ``heldout_prompts.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from edgemtp.bench.prompts import load_prompts
from edgemtp.config import MTP_FUSION_KEY
from edgemtp.errors import UserError
from edgemtp.training import data
from edgemtp.training.mtp_torch import TRAINABLE_MODEL_TYPES, MTPHeads
from edgemtp.training.trunk_torch import build_trunk, load_tokenizer, open_reader


@dataclass
class RecipeConfig:
    steps: int = 2000
    layers: int = 1  # MTP layers saved; depths past this reuse the last layer
    depths: int = 3  # depths trained (k=3 drafting uses depths 1..3)
    fusion_layers: tuple[int, int] | None = None  # a fusion head's two trunk layers (mtp_torch.py); None: plain head
    seq_len: int = 512
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    chat_fraction: float = 0.75  # share of each step's rows (as tokens: rows x seq_len) given to trunk-written chats
    hard_label_weight: float = 0.0  # weight of a cross-entropy on the trunk's argmax, added to the KL
    fp32: bool = False  # on CUDA, train and evaluate in float32 (TF32 matmuls) instead of bfloat16
    init_from: str | None = None  # warm start from an earlier run's mtp.safetensors
    time_limit_minutes: float | None = None  # stop training early (and still save) past this
    chat_requests: int = 6000  # user requests the trunk answers (greedy), at most
    sampled_requests: int = 2000  # of those, also answered again with sampling, for variety
    sample_temperature: float = 0.8
    self_instruct_requests: int = 4000  # user requests the trunk writes itself (sampled), then answers greedily
    chats_file: str | None = None  # cache of the trunk-written chats, reused by a later run with the same data settings
    max_new_tokens: int = 256
    gen_batch_size: int = 512
    num_heldout: int = 60
    eval_new_tokens: int = 128
    log_every: int = 25
    seed: int = 0
    device: str = "cpu"


def _pad_rows(rows: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (or cut) token lists to ``width``; mask marks real tokens."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, row in enumerate(rows):
        row = row[:width]
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = True
    return ids, mask


def chat_batches(lengths: list[int], token_budget: int, generator: torch.Generator, pool: int = 1024):
    """Endless batches of chat indices, each padded to its longest chat within ``token_budget`` tokens.

    Chats are a few hundred tokens long, so padding every row to ``seq_len`` would spend most
    of a step on padding. Each epoch visits every chat once, in a random order; every
    ``pool`` chats are sorted by length and cut into batches of similar lengths (the
    batches of a pool are shuffled, so consecutive steps do not grow steadily longer).
    """
    while True:
        order = torch.randperm(len(lengths), generator=generator).tolist()
        for start in range(0, len(order), pool):
            batches, batch = [], []
            for k in sorted(order[start : start + pool], key=lambda k: lengths[k]):
                if batch and (len(batch) + 1) * lengths[k] > token_budget:
                    batches.append(batch)
                    batch = []
                batch.append(k)
            batches.append(batch)
            for j in torch.randperm(len(batches), generator=generator).tolist():
                yield batches[j]


def _depth_terms(heads, trunk, ids: torch.Tensor, mask: torch.Tensor, depths: int):
    """Per depth: (summed KL from the trunk, summed cross-entropy on the trunk's argmax,
    top-1 agreements, positions), teacher forced."""
    with torch.no_grad():
        out = trunk.model(input_ids=ids, output_hidden_states=heads.fusion_layers is not None)
        # after the final norm, as the backends hand it over
        teacher = trunk.lm_head(out.last_hidden_state).float().log_softmax(-1)  # once for every depth
    terms = []
    outputs = heads(_feature(heads, out), ids, trunk.model.embed_tokens, depths)
    for depth, h in enumerate(outputs, start=1):
        logits = heads.logits(depth, h, trunk.lm_head).float()
        target = teacher[:, depth:]  # trunk's distribution for token i+depth+1
        # Entry i is valid when its prediction target t[i+depth+1] is a real token.
        valid = mask[:, depth + 1 :]
        valid = torch.cat([valid, torch.zeros_like(valid[:, :1])], dim=1)
        # KL(trunk || head): the soft-target cross-entropy minus the trunk's own entropy,
        # so 0 means the head reproduces the trunk exactly.
        log_probs = logits.log_softmax(-1)
        kl = F.kl_div(log_probs, target, log_target=True, reduction="none").sum(-1)
        # Greedy acceptance counts only the argmax; this term (weighted by hard_label_weight)
        # spends the head's capacity on the trunk's top token rather than its whole distribution.
        top = target.argmax(-1)
        ce = -log_probs.gather(-1, top.unsqueeze(-1)).squeeze(-1)
        agree = (logits.argmax(-1) == top) & valid
        terms.append(((kl * valid).sum(), (ce * valid).sum(), agree.sum(), int(valid.sum())))
    return terms


def _feature(heads, trunk_out) -> torch.Tensor:
    """Depth 1's input from a trunk forward, in the heads' dtype (``MTPHeads.trunk_feature``)."""
    dtype = heads.layers[0].eh_proj.weight.dtype
    if heads.fusion_layers is None:
        return trunk_out.last_hidden_state.to(dtype)
    return heads.trunk_feature(type(trunk_out)(last_hidden_state=trunk_out.last_hidden_state.to(dtype),
                                                hidden_states=tuple(h.to(dtype) for h in trunk_out.hidden_states)))


@torch.no_grad()
def measure_acceptance(heads, trunk, sequences: list[tuple[int, list[int]]], depths: int) -> dict:
    """Greedy acceptance on the trunk's own greedy continuations, teacher forced.

    ``sequences`` holds (prompt length, prompt + greedy reply). At every reply
    position i, draft d is accepted when the depth-d head's argmax equals the
    trunk's argmax for the same token. Because the replies are greedy, a correct
    depth-1 draft equals the true token, so teacher forcing reproduces exactly what
    a chained draft of length k would see: the accepted length at i is the number
    of leading accepted depths, and the mean tokens per verification step is
    1 + that (the trunk always adds one token).
    """
    device = next(trunk.parameters()).device
    agree_counts, totals = [0] * depths, [0] * depths
    accepted_lengths = []
    for prompt_len, seq in sequences:
        ids = torch.tensor([seq], device=device)
        out = trunk.model(input_ids=ids, output_hidden_states=heads.fusion_layers is not None)
        trunk_argmax = trunk.lm_head(out.last_hidden_state).argmax(-1)[0]
        outputs = heads(_feature(heads, out), ids, trunk.model.embed_tokens, depths)
        # Drafts start once the reply starts: entry i drafts tokens i+2.. with i+1 >= prompt_len.
        starts = range(prompt_len - 1, len(seq) - depths - 1)
        hits = []
        for depth, h in enumerate(outputs, start=1):
            draft = heads.logits(depth, h, trunk.lm_head).argmax(-1)[0]
            hit = (draft[list(starts)] == trunk_argmax[[i + depth for i in starts]]).tolist()
            agree_counts[depth - 1] += sum(hit)
            totals[depth - 1] += len(hit)
            hits.append(hit)
        for per_depth in zip(*hits):
            run = 0
            while run < depths and per_depth[run]:
                run += 1
            accepted_lengths.append(run)
    marginal = [a / t if t else 0.0 for a, t in zip(agree_counts, totals)]
    by_position = [sum(n >= d for n in accepted_lengths) / max(1, len(accepted_lengths)) for d in range(1, depths + 1)]
    return {
        "positions": len(accepted_lengths),
        "top1_agreement_by_depth": marginal,
        "acceptance_by_position": by_position,
        "mean_accepted_length": 1 + sum(accepted_lengths) / max(1, len(accepted_lengths)),
        "num_draft": depths,
    }


def _greedy_acceptance(heads, trunk, tokenizer, requests: list[str], config: RecipeConfig) -> dict:
    """``measure_acceptance`` on the trunk's greedy replies to ``requests``."""
    prompts = [data.chat_prompt_ids(tokenizer, r) for r in requests]
    replies = data.generate_replies(trunk, prompts, temperature=0.0, max_new_tokens=config.eval_new_tokens,
                                    batch_size=config.gen_batch_size, **_special_ids(tokenizer))
    device = next(trunk.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=_bf16(device, config)):
        return measure_acceptance(heads, trunk, [(len(p), s) for p, s in zip(prompts, replies)], config.depths)


_KINDS = {"topical_chat": "chat", "tinystories": "story", "code": "code", "qa": "qa"}


def _heldout_by_kind(heldout: list[dict]) -> dict[str, list[str]]:
    """Held-out prompts grouped by kind of request (chat, story, code, qa)."""
    groups: dict[str, list[str]] = {}
    for h in heldout:
        groups.setdefault(_KINDS[h["source"]], []).append(h["prompt"])
    return groups


def _bf16(device: torch.device, config: RecipeConfig) -> bool:
    """Whether training and evaluation run under bfloat16 autocast (CUDA, unless ``fp32``)."""
    return device.type == "cuda" and not config.fp32


def _special_ids(tokenizer) -> dict:
    """``eos_id`` and ``pad_id`` (the EOS token where the tokenizer has no padding token)."""
    eos_id = tokenizer.eos_token_id
    return {"eos_id": eos_id, "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id}


def _trunk_written_chats(trunk, tokenizer, corpus, trunk_name: str, config: RecipeConfig, progress) -> tuple[list[list[int]], dict]:
    """Chats whose assistant turns the trunk wrote, and how many requests of each kind went in.

    Corpus requests are answered greedily (and the first ``sampled_requests`` again with
    sampling, for variety); requests the trunk writes itself are answered greedily. With
    ``config.chats_file``, the chats are read from there when it was written for the same
    trunk (file name and config) and data settings, and written there otherwise, so that a
    chain of warm-started runs generates them once.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    requests = corpus.requests[: config.chat_requests]
    # The requests themselves are part of the key: a change in how the corpus is read into
    # requests must not reuse chats answering the old ones.
    requests_hash = hashlib.sha256("\x00".join(requests).encode()).hexdigest()
    settings = {"trunk": trunk_name, "trunk_config": trunk.config.to_dict(), "corpus_files": corpus.files,
                "requests_sha256": requests_hash,
                **{k: getattr(config, k) for k in ("chat_requests", "sampled_requests", "sample_temperature",
                                                   "self_instruct_requests", "max_new_tokens", "num_heldout", "seed")}}
    key = json.dumps(settings, sort_keys=True, default=str)
    cache = Path(config.chats_file) if config.chats_file else None
    if cache and cache.exists():
        try:
            with safe_open(str(cache), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("settings") == key:
                    tokens, lengths = f.get_tensor("tokens"), f.get_tensor("lengths")
                    progress(f"trunk-written chats read from {cache}")
                    chats = [row.tolist() for row in torch.split(tokens, lengths.tolist())]
                    return chats, json.loads(meta["counts"])
        except Exception as exc:  # safetensors raises its own error types on bad files
            raise UserError(f"{cache} is not a chats file written by train-mtp ({exc}); "
                            "delete it or pass another --chats-file") from None
        progress(f"{cache} was written for other data settings; generating the chats again")

    gen = dict(max_new_tokens=config.max_new_tokens, batch_size=config.gen_batch_size, **_special_ids(tokenizer))
    prompts = [data.chat_prompt_ids(tokenizer, r) for r in requests]
    chats = data.generate_replies(trunk, prompts, temperature=0.0, **gen)
    chats += data.generate_replies(trunk, prompts[: config.sampled_requests], temperature=config.sample_temperature, **gen)
    own = data.self_instruct_requests(trunk, tokenizer, config.self_instruct_requests, temperature=config.sample_temperature,
                                      seed=config.seed, **{**gen, "max_new_tokens": data.REQUEST_MAX_TOKENS})
    evaluation_only = {h["prompt"] for h in data.heldout_general()} | set(load_prompts())
    own = [r for r in own if r not in evaluation_only]
    chats += data.generate_replies(trunk, [data.chat_prompt_ids(tokenizer, r) for r in own], temperature=0.0, **gen)
    counts = {"chat_requests": len(requests), "sampled_requests": min(len(prompts), config.sampled_requests),
              "self_written_requests": len(own), "self_written_request_examples": own[:20]}
    if cache:
        lengths = torch.tensor([len(c) for c in chats], dtype=torch.int64)
        tokens = torch.tensor([t for c in chats for t in c], dtype=torch.int32)
        meta = {"settings": key, "counts": json.dumps(counts)}
        _write_atomic(cache, lambda p: save_file({"tokens": tokens, "lengths": lengths}, str(p), metadata=meta))
    return chats, counts


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    os.replace(tmp, path)


def train_mtp(trunk_path: str | Path, out_dir: str | Path, corpus_dir: str | Path, config: RecipeConfig, progress=print) -> dict:
    """Run the recipe; write the MTP weights, log and held-out prompts to ``out_dir``; return the log."""
    from safetensors.torch import save_file

    if config.layers not in (1, 2):
        raise UserError(f"--layers must be 1 or 2, got {config.layers}")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    started = time.time()
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    reader = open_reader(trunk_path)
    if reader.config["model_type"] not in TRAINABLE_MODEL_TYPES:
        raise UserError(f"{trunk_path}: train-mtp trains MTP layers for {', '.join(TRAINABLE_MODEL_TYPES)} trunks, not "
                        f"{reader.config['model_type']}; GLM-4.5 and DeepSeek-V3 checkpoints ship their own MTP layers")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    trunk_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    trunk = build_trunk(reader, device=config.device, dtype=trunk_dtype)
    tokenizer = load_tokenizer(trunk_path, reader)
    pad_id = _special_ids(tokenizer)["pad_id"]

    # --- data ---------------------------------------------------------------
    corpus = data.load_corpus(corpus_dir, num_heldout=config.num_heldout, seed=config.seed)
    texts = data.text_chunks(tokenizer, corpus.texts, config.seq_len)
    t0 = time.time()
    chats, chat_counts = _trunk_written_chats(trunk, tokenizer, corpus, Path(trunk_path).name, config, progress)
    gen_seconds = time.time() - t0
    chat_tokens = sum(min(len(c), config.seq_len) for c in chats)
    progress(f"data: {len(texts)} text windows, {len(chats)} trunk-written chats ({chat_tokens} tokens) in {gen_seconds:.0f}s")
    if device.type == "cuda" and config.fp32:
        # The chats above come from the bfloat16 trunk (fast; they are only text). The teacher
        # and the evaluation use float32 like the runtimes' activations, so the head learns the
        # argmax it will be checked against; TF32 keeps the matmuls fast.
        torch.backends.cuda.matmul.allow_tf32 = True
        trunk.float()

    # --- model --------------------------------------------------------------
    heads = MTPHeads(trunk.config, config.layers, config.fusion_layers).to(device)
    heads.init_from_trunk(trunk)
    if config.init_from:
        from safetensors.torch import load_file

        init_path = Path(config.init_from)
        if not init_path.is_file():
            raise UserError(f"{init_path}: --init-from file not found; pass an earlier run's mtp.safetensors")
        found = heads.load_hf_state_dict(load_file(str(init_path)))
        progress(f"warm start from {init_path} ({found} layer(s))")
    heads.to(torch.float32).train()
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        progress_ = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_)))

    generator = torch.Generator().manual_seed(config.seed)
    n_chat = round(config.batch_size * config.chat_fraction)
    # Chats fill the token budget of n_chat full rows, packed by length (chat_batches).
    batches = chat_batches([min(len(c), config.seq_len) for c in chats], n_chat * config.seq_len, generator)
    curve = []
    t0 = time.time()
    deadline = started + 60 * config.time_limit_minutes if config.time_limit_minutes else math.inf
    steps_done = 0
    for step in range(config.steps):
        if time.time() > deadline:
            progress(f"time limit reached after {step} steps; stopping early")
            break
        chat_rows = [chats[k] for k in next(batches)] if n_chat else []
        text_rows = texts[torch.randint(len(texts), (config.batch_size - n_chat,), generator=generator)].tolist()
        per_part = []  # chats and text are padded separately: each to its own longest row
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=_bf16(device, config)):
            for rows in (chat_rows, text_rows):
                if rows:
                    ids, mask = _pad_rows(rows, min(max(map(len, rows)), config.seq_len), pad_id)
                    per_part.append(_depth_terms(heads, trunk, ids.to(device), mask.to(device), config.depths))
        # Per depth, means over every predicted position of the step (chats and text alike).
        terms = []  # per depth: (mean KL, mean cross-entropy on the argmax, agreement)
        for by_part in zip(*per_part):
            positions = max(1, sum(part[3] for part in by_part))
            terms.append(tuple(sum(part[j] for part in by_part) / positions for j in range(3)))
        loss = sum(kl + config.hard_label_weight * ce for kl, ce, _ in terms) / len(terms)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
        optimizer.step()
        steps_done = step + 1
        if step % config.log_every == 0 or step == config.steps - 1:
            entry = {
                "step": step,
                "loss": loss.item(),
                "kl_by_depth": [kl.item() for kl, _, _ in terms],
                "argmax_ce_by_depth": [ce.item() for _, ce, _ in terms],
                "top1_agreement_by_depth": [a.item() for _, _, a in terms],
                "lr": lr_at(step),
            }
            curve.append(entry)
            progress(f"step {step}: loss {entry['loss']:.4f} agreement {[round(a, 3) for a in entry['top1_agreement_by_depth']]}")
    train_seconds = time.time() - t0

    # --- held-out greedy acceptance ---------------------------------------------
    heads.eval()
    heldout = _greedy_acceptance(heads, trunk, tokenizer, [h["prompt"] for h in corpus.heldout], config)
    progress(f"held-out greedy acceptance: {heldout}")
    general = _greedy_acceptance(heads, trunk, tokenizer, load_prompts(), config)
    progress(f"bench-prompt greedy acceptance: {general}")
    by_kind = {}  # chat (Topical-Chat), story (TinyStories), code and qa (heldout_general.jsonl)
    for kind, prompts in _heldout_by_kind(corpus.heldout + data.heldout_general()).items():
        by_kind[kind] = _greedy_acceptance(heads, trunk, tokenizer, prompts, config)
        progress(f"held-out {kind}: {by_kind[kind]}")

    # --- outputs ---------------------------------------------------------------
    precision = "bf16 torch, teacher forced" if _bf16(device, config) else "fp32 torch, teacher forced"
    weights = heads.hf_state_dict(torch.float16)
    metadata = {"format": "pt", "num_nextn_predict_layers": str(config.layers), "trunk": Path(trunk_path).name}
    if config.fusion_layers is not None:
        metadata[MTP_FUSION_KEY] = json.dumps(list(config.fusion_layers))
    _write_atomic(out_dir / "mtp.safetensors", lambda p: save_file(weights, str(p), metadata=metadata))
    lines = "".join(json.dumps(h, ensure_ascii=False) + "\n" for h in corpus.heldout)
    _write_atomic(out_dir / "heldout_prompts.jsonl", lambda p: p.write_text(lines, encoding="utf-8"))
    log = {
        "trunk": Path(trunk_path).name,
        "config": asdict(config),
        "data": {
            "corpus_files": corpus.files,
            "text_windows": len(texts),
            **chat_counts,
            "trunk_written_chats": len(chats),
            "trunk_written_chat_tokens": chat_tokens,
            "heldout_prompts": len(corpus.heldout),
        },
        "mtp_parameters": sum(p.numel() for p in heads.layers.parameters()),
        "steps_done": steps_done,
        "tokens_seen": steps_done * config.batch_size * config.seq_len,
        "seconds": {"generation": round(gen_seconds, 1), "training": round(train_seconds, 1), "total": round(time.time() - started, 1)},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "loss_curve": curve,
        "heldout_greedy_acceptance": {**heldout, "precision": precision},
        "bench_prompts_greedy_acceptance": {**general, "precision": precision},
        "heldout_greedy_acceptance_by_kind": {kind: {**m, "precision": precision} for kind, m in by_kind.items()},
    }
    _write_atomic(out_dir / "training_log.json", lambda p: p.write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8"))
    return log
