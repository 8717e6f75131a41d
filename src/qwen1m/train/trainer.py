"""The training loop: progressive context extension over the recipe's stages (design §5.2).

Each stage rebuilds the model with its RoPE base (ABF: only the base changes, weights carry over),
keeps the AdamW moments, warms up and decays its learning rate on a cosine, and ends by writing a
Hugging Face folder ``out/<stage name>/``. ``out/state.pt`` (model, optimizer, stage, step, log) makes
the run resumable: rerunning the same command continues where it stopped. The final stage's folder
also carries ``dual_chunk_attention_config`` when the recipe asks for it and is copied to ``out/final``.

Loss: per-row mean over the tokens whose mask is set, then the mean over rows, so a passkey row with
six answer tokens weighs as much as a row of natural text.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qwen1m.config import ModelConfig
from qwen1m.errors import ConfigError
from qwen1m.model.qwen2 import Qwen2ForCausalLM
from qwen1m.train.chat_template import QWEN2_5_CHAT_TEMPLATE
from qwen1m.train.checkpoint import load_state, model_config, save_hf_folder, save_state
from qwen1m.train.corpus import build_corpus
from qwen1m.train.data import BatchStream, make_batch
from qwen1m.train.encoding import Encoder
from qwen1m.train.plots import plot_losses
from qwen1m.train.recipe import Recipe, Stage, load_recipe
from qwen1m.train.tasks import TaskContext, tokenizer_texts
from qwen1m.train.tokenizer_train import ENDOFTEXT, IM_END, train_tokenizer

log = logging.getLogger(__name__)

CALIBRATION_STEPS = (2, 4)  # (untimed warm-up, timed) steps used to turn a stage's time_s into steps


def prepare_data(recipe: Recipe, out_dir: Path) -> tuple[Any, TaskContext]:
    """Corpus -> tokenizer (trained once, then reused from out_dir on resume) -> tokenised context."""
    from tokenizers import Tokenizer

    corpus = {"num_grammar": 20000, "stdlib": True, "text_files": (), **recipe.corpus}
    paragraphs = build_corpus(seed=recipe.seed, **corpus)
    saved = out_dir / "tokenizer.json"
    if "path" in recipe.tokenizer:
        p = Path(recipe.tokenizer["path"])
        tok = Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))
    elif saved.is_file():
        tok = Tokenizer.from_file(str(saved))
    else:
        tok = train_tokenizer(tokenizer_texts(paragraphs, recipe.seed), recipe.tokenizer.get("vocab_size", 4096))
        tok.save(str(saved))
    ctx = TaskContext.build(Encoder(tok), paragraphs)
    ctx.warm_families()
    return tok, ctx


def lr_at(stage: Stage, step: int, steps: int) -> float:
    """Linear warm-up, then cosine from ``lr`` down to ``lr * min_lr_ratio`` at the last step."""
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    progress = (step - stage.warmup_steps) / max(1, steps - stage.warmup_steps)
    floor = stage.lr * stage.min_lr_ratio
    return floor + 0.5 * (stage.lr - floor) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def masked_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits [B, T-1, vocab] predicting ids[:, 1:]; mask [B, T] -> per-row masked mean, row mean."""
    tgt, m = ids[:, 1:], mask[:, 1:].float()
    tok = F.cross_entropy(logits.float().transpose(1, 2), tgt, reduction="none")  # [B, T-1]
    rows = m.sum(1) > 0
    per_row = (tok * m).sum(1) / m.sum(1).clamp(min=1.0)
    return per_row[rows].mean()


def init_weights(model: torch.nn.Module, std: float) -> None:
    """transformers' Qwen2 init: normal(0, std) weights, zero biases, RMSNorm weights at one."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith(".bias"):
            torch.nn.init.zeros_(p)
        else:
            torch.nn.init.normal_(p, 0.0, std)


def load_init_weights(model: torch.nn.Module, folder: Path) -> None:
    """Start from a checkpoint's weights (HF names, any float dtype); the shapes must be the recipe's."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    own = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = sorted(k for k in own if k not in tensors and not (tied and k == "lm_head.weight"))
    unexpected = sorted(k for k in tensors if k not in own)
    wrong = sorted(k for k in tensors if k in own and tensors[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        raise ConfigError(f"recipe field 'init_from': {folder / 'model.safetensors'} does not match the recipe's "
                          f"model (missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {wrong[:3]}).")
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].copy_(t.to(own[k].dtype))


def _stage_cfg(recipe: Recipe, stage: Stage, vocab: int, bos: int, eos: int, final: bool) -> dict[str, Any]:
    return model_config(recipe.model, vocab, stage.seq_len, stage.rope_theta, bos, eos, final and recipe.dca)


def _optimizer(model: torch.nn.Module, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    o = recipe.optimizer
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.get("weight_decay", 0.1)},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, betas=(o.get("beta1", 0.9), o.get("beta2", 0.95)),
                             eps=1e-8, fused=device.type == "cuda")


class _Run:
    """One training run's mutable state; kept out of module scope (no module state)."""

    def __init__(self, recipe: Recipe, out_dir: Path, device: torch.device):
        self.recipe, self.out, self.device = recipe, out_dir, device
        self.autocast = device.type == "cuda"
        self.tok, self.ctx = prepare_data(recipe, out_dir)
        self.bos, self.eos = self.tok.token_to_id(ENDOFTEXT), self.tok.token_to_id(IM_END)
        self.vocab = self.tok.get_vocab_size()
        self.entries: list[dict[str, Any]] = []
        self.stages_done: list[dict[str, Any]] = []
        self.resolved_steps: dict[str, int] = {}

    def step(self, model, opt, stage: Stage, ids, mask, lr: float) -> float:
        for g in opt.param_groups:
            g["lr"] = lr
        ids, mask = ids.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = model.forward_train(ids[:, :-1], self.recipe.gradient_checkpointing)
        loss = masked_loss(logits, ids, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.recipe.optimizer.get("grad_clip", 1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def calibrate(self, model, opt, si: int, stage: Stage) -> int:
        """Steps that fit ``stage.time_s``: time a few real steps on copies, then throw them away."""
        m, o = copy.deepcopy(model), _optimizer(model, self.recipe, self.device)
        o.load_state_dict(opt.state_dict())
        warm, timed = CALIBRATION_STEPS
        t_data = time.perf_counter()
        batch = make_batch(self.ctx, self.recipe.seed, si, 0, stage.batch_size, stage.seq_len, stage.mix,
                           stage.short_fraction)
        t_data = time.perf_counter() - t_data
        for i in range(warm + timed):
            if i == warm:
                self._sync()
                t0 = time.perf_counter()
            self.step(m, o, stage, *batch, stage.lr * 1e-3)
        self._sync()
        t_step = (time.perf_counter() - t0) / timed
        workers = max(1, self.recipe.num_workers)
        per_step = max(t_step, t_data / workers)
        steps = max(1, int(stage.time_s / per_step))
        log.info("stage %s: %.3f s/step on the device, %.2f s/batch of data x %d workers -> %d steps",
                 stage.name, t_step, t_data, workers, steps)
        return steps

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def loader(self, si: int, stage: Stage, start: int, steps: int):
        ds = BatchStream(self.ctx, self.recipe.seed, si, start, steps, stage.batch_size, stage.seq_len,
                         stage.mix, stage.short_fraction)
        nw = self.recipe.num_workers
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=nw,
                                           prefetch_factor=4 if nw else None,
                                           pin_memory=self.device.type == "cuda")

    def state(self, model, opt, si: int, step: int, done: bool) -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "stage": si, "step": step,
                "stage_done": done, "entries": self.entries, "stages_done": self.stages_done,
                "resolved_steps": self.resolved_steps}


def run_recipe(recipe: str | Path | Recipe, out_dir: str | Path, device: str = "auto",
               resume: bool = True, on_stage_end: Callable[[Path], None] | None = None) -> Path:
    """Train every stage of ``recipe`` into ``out_dir``; returns the final checkpoint folder.
    ``on_stage_end(folder)`` runs after each stage's checkpoint is written (e.g. to copy it away)."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    state = load_state(out / "state.pt") if resume else None
    if _finished(state, recipe, out):  # checked before the data is built: a rerun returns at once
        log.info("the run in %s is complete (stage %d of %d, step %d); nothing to do", out, len(recipe.stages),
                 len(recipe.stages), state["step"])
        return out / "final"
    torch.manual_seed(recipe.seed)
    t_start = time.perf_counter()
    run = _Run(recipe, out, dev)
    log.info("data ready in %.1f s: %d paragraphs, vocab %d", time.perf_counter() - t_start,
             len(run.ctx.paragraphs), run.vocab)
    si0, step0 = 0, 0
    if state is not None:
        run.entries, run.stages_done = state["entries"], state["stages_done"]
        run.resolved_steps = state["resolved_steps"]
        si0, step0 = (state["stage"] + 1, 0) if state["stage_done"] else (state["stage"], state["step"])
        log.info("resuming at stage %d step %d", si0, step0)
    prev_model, prev_opt = (state["model"], state["optimizer"]) if state is not None else (None, None)
    last = len(recipe.stages) - 1
    for si in range(si0, len(recipe.stages)):
        stage = recipe.stages[si]
        cfg_dict = _stage_cfg(recipe, stage, run.vocab, run.bos, run.eos, final=si == last)
        model = Qwen2ForCausalLM(ModelConfig.from_dict(cfg_dict)).to(dev)
        if prev_model is None and recipe.init_from is not None:
            load_init_weights(model, Path(recipe.init_from))
        elif prev_model is None:
            init_weights(model, recipe.model.get("initializer_range", 0.02))
        else:
            model.load_state_dict(prev_model)
        opt = _optimizer(model, recipe, dev)
        if prev_opt is not None:
            opt.load_state_dict(prev_opt)
        model.train()
        steps = stage.steps or run.resolved_steps.get(stage.name) or run.calibrate(model, opt, si, stage)
        run.resolved_steps[stage.name] = steps
        t_stage = time.perf_counter()
        losses: list[float] = []
        for step, ids, mask in run.loader(si, stage, step0, steps):
            lr = lr_at(stage, step, steps)
            loss = run.step(model, opt, stage, ids, mask, lr)
            losses.append(loss)
            if (step + 1) % recipe.log_every == 0 or step + 1 == steps:
                entry = {"stage": stage.name, "step": step + 1, "seq_len": stage.seq_len, "lr": lr,
                         "loss": sum(losses[-recipe.log_every:]) / len(losses[-recipe.log_every:]),
                         "elapsed_s": round(time.perf_counter() - t_start, 2)}
                run.entries.append(entry)
                log.info("%(stage)s step %(step)d loss %(loss).4f lr %(lr).2e t %(elapsed_s).0fs", entry)
            if recipe.save_every and (step + 1) % recipe.save_every == 0 and step + 1 < steps:
                save_state(out / "state.pt", run.state(model, opt, si, step + 1, False))
        step0 = 0
        tail = losses[-max(1, min(len(losses), recipe.log_every)):]
        run.stages_done.append({"name": stage.name, "seq_len": stage.seq_len, "rope_theta": stage.rope_theta,
                                "steps": steps, "tokens": steps * stage.batch_size * stage.seq_len,
                                "seconds": round(time.perf_counter() - t_stage, 1),
                                "final_loss": sum(tail) / len(tail) if tail else None})
        save_hf_folder(model, out / stage.name, cfg_dict, run.tok, QWEN2_5_CHAT_TEMPLATE)
        save_state(out / "state.pt", run.state(model, opt, si, steps, True))
        _write_log(run, recipe, out, dev, time.perf_counter() - t_start)
        if on_stage_end is not None:
            on_stage_end(out / stage.name)
        prev_model, prev_opt = model.state_dict(), opt.state_dict()
    final = out / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(out / recipe.stages[-1].name, final)
    _write_log(run, recipe, out, dev, time.perf_counter() - t_start)
    return final


def _finished(state: dict[str, Any] | None, recipe: Recipe, out: Path) -> bool:
    """The state says the recipe's last stage is done and the final folder is in place."""
    return (state is not None and state["stage_done"] and state["stage"] == len(recipe.stages) - 1
            and (out / "final" / "config.json").is_file())


def _write_log(run: _Run, recipe: Recipe, out: Path, dev: torch.device, seconds: float) -> None:
    resolved = recipe.to_json()
    for s in resolved["stages"]:
        s["steps"] = run.resolved_steps.get(s.get("name", ""), s.get("steps"))
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    doc = {"recipe": resolved, "device": device_name, "torch": torch.__version__,
           "total_seconds_this_run": round(seconds, 1), "stages": run.stages_done, "log": run.entries}
    (out / "train_log.json").write_text(json.dumps(doc, indent=1) + "\n")
    if not plot_losses(run.entries, out / "loss.png"):
        log.debug("matplotlib is not installed: no loss.png (the JSON log has the curve)")
