"""CASH: Capacity-Aware Selective Hashing for continual cross-modal retrieval.

Frozen features are adapted to each task by a learnable task prompt ``P_t`` (tokens x
width) read through one shared multi-head cross-attention, gated by a per-task
discriminator head: ``a = MHA(x, P_t, P_t)``, ``g = sigmoid(w_t . x + b_t)``,
``z = x + g a``. Per modality a fine and a coarse branch (``Linear-ReLU-Linear`` +
L2-normalise) give two code candidates; a prompt-conditioned mask
``m = tanh(L2norm(mask(a)))`` selects per bit: ``h = tanh(f)(1-m)/2 + tanh(c)(1+m)/2``,
code ``sign(h)``. The code length is fixed; old prompts and heads are frozen.

Deviations from the public code, each on purpose:
- Task heads are trained task-vs-others (binary cross-entropy), not with positives only:
  the negatives of head t are ``head_negatives`` saved raw train features of every
  earlier task (evenly spaced rows, both modalities). They are used by the heads only,
  never by the hash networks. ``head_negatives: 0`` restores the public objective,
  ``mean(1 - g)`` over the current task's samples (positives only).
- The newest task head trains with an AdamW of its own at ``head_lr`` (1e-3): at the
  authors' 1e-5 / 1e-6 a freshly initialised ``Linear`` head hardly moves in 100 epochs,
  so its gate stays near ``sigmoid(init)`` and cannot tell tasks apart. ``head_lr: null``
  trains it with the nets at the shared rate, as the public code does.
- Task-agnostic encoding picks the task per sample and per modality with
  ``task_inference: cascade`` (default): the newest task whose head fires
  (logit > 0), else the arg-max head. Head k is trained against tasks < k, so the
  newest firing head is the decision that training supports; ``argmax`` (the public
  rule) is available. The chosen head's gate is applied as in task-known encoding
  (the public code drops the gate there).
- The train-set code banks ``U`` of the coarse loss start from the codes of the model
  at the start of the task (one no-grad pass in ``begin_epoch`` of the first epoch),
  not from random normal noise.
- ``H_old`` of the exclusion loss is recomputed after the task from the kept (best
  validation) model instead of the training buffer of that epoch.
- Features whose width differs from ``width`` (or image and text of different widths)
  pass through a per-modality ``Linear`` trained on the first task only
  (see ``models.prompts.input_projection``).
- Prompts are drawn from N(0, prompt_std^2) with ``prompt_std`` null = ``1/sqrt(width)``
  (rows of norm about 1, like the L2-normalised features this library extracts); the
  public code draws N(0, 1), i.e. rows of norm sqrt(width), which on unit-norm
  features swamps the sample in the attention output (``prompt_std: 1.0`` restores it).
- Biases of the branch and mask MLPs start at zero (weights keep PyTorch's default
  init), so an untrained code is a function of the input rather than of the biases.
- Model selection happens on the task's validation split (runner), never on queries.
- ``consistency_weight`` (0 = the public code, which has no such term): the saved
  train rows of each earlier task (the heads' negatives) also keep the continuous
  codes they had when their task ended, and later tasks pay
  ``MSE(h_k(x), h_k^saved(x))`` for them, each under its own task's prompt and head.
  Each step replays as many saved rows as the batch has, row ``i mod N`` for every
  train position ``i`` of the batch: the choice follows the runner's seeded shuffle
  and needs no state of its own (resuming replays the same rows).
  This is the method's own promise (codes written to the database stay valid) made
  a training signal on the few rows CASH already keeps; without it only a low
  learning rate of later tasks limits the drift of the shared nets.

Knobs the public code does not have, whose null / zero default is the public behaviour:
``prompt_lr_scale`` (the newest prompt's rate; null = with the nets) and
``exclusion_scale`` (the ``K`` of the exclusion target ``K * S``; null = bits).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from common.register import MODELS
from models import losses as L
from models.base import Batch, HashModel
from models.prompts import (
    PromptBank, PromptCrossAttention, common_width, input_projection, zero_biases,
)
from utils.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from common.code_store import CodeStore
    from dataset.feature_set import Task

BANKS = ("coarse_image", "coarse_text", "hash_image", "hash_text")


class BranchMLP(nn.Module):
    """``Linear(in, hidden) - ReLU - Linear(hidden, bits)`` followed by L2-normalisation."""

    def __init__(self, in_dim: int, hidden: int, bits: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, bits))
        zero_biases(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


def select_bits(fine: torch.Tensor, coarse: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bit-wise selection ``tanh(f)(1-m)/2 + tanh(c)(1+m)/2`` (m -> +1 picks coarse)."""
    return torch.tanh(fine) * (1 - mask) / 2 + torch.tanh(coarse) * (1 + mask) / 2


def infer_task(logits: torch.Tensor, rule: str) -> torch.Tensor:
    """Task index per row of head logits ``(B, T)``: ``argmax``, or ``cascade`` = the
    newest head with a positive logit, falling back to the arg-max when none fires."""
    best = logits.argmax(dim=1)
    if rule == "argmax":
        return best
    fired = logits > 0
    T = logits.shape[1]
    newest = T - 1 - fired.flip(1).float().argmax(dim=1)
    return torch.where(fired.any(dim=1), newest, best)


@MODELS.register("CASH")
class CASH(HashModel):
    """CASH with per-task prompts, task heads, coarse-fine branches and a bit mask."""

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        num_classes: int,
        bits: int = 16,
        width: Optional[int] = None,
        hidden: int = 4096,
        heads: int = 8,
        prompt_std: Optional[float] = None,
        prompt_length: int = 10,
        prompt_mode: Literal["share", "separate"] = "share",
        quant_weight: float = 1.0,
        fine_weight: float = 0.01,
        coarse_weight: float = 10.0,
        task_weight: float = 1.0,
        distill_weight: float = 10.0,
        exclusion_weight: float = 1.0,
        consistency_weight: float = 0.0,
        exclusion_scale: Optional[float] = None,
        temperature: float = 0.07,
        later_lr_scale: float = 0.1,
        prompt_lr_scale: Optional[float] = None,
        head_lr: Optional[float] = 1e-3,
        head_negatives: int = 256,
        task_inference: Literal["cascade", "argmax"] = "cascade",
    ) -> None:
        super().__init__(image_dim, text_dim, num_classes, bits)
        self.width = common_width(image_dim, text_dim, width, heads)
        for key, value in (("width", self.width), ("hidden", hidden), ("heads", heads), ("prompt_length", prompt_length)):
            if value < 1:
                raise ConfigError(f"model.{key}: must be a positive integer, got {value}")
        if self.width % heads:
            raise ConfigError(f"model.width: {self.width} is not divisible by model.heads = {heads}")
        if prompt_std is not None and prompt_std <= 0:
            raise ConfigError(f"model.prompt_std: must be positive or null (1/sqrt(width)), got {prompt_std}")
        if temperature <= 0:
            raise ConfigError(f"model.temperature: must be positive, got {temperature}")
        if head_negatives < 0:
            raise ConfigError(f"model.head_negatives: must be >= 0, got {head_negatives}")
        self.prompt_length = int(prompt_length)
        self.prompt_mode = prompt_mode
        self.weights = {
            "quant": quant_weight, "fine": fine_weight, "coarse": coarse_weight,
            "task": task_weight, "distill": distill_weight, "exclusion": exclusion_weight,
            "consistency": consistency_weight,
        }
        self.exclusion_scale = exclusion_scale
        self.temperature = float(temperature)
        self.later_lr_scale = float(later_lr_scale)
        self.prompt_lr_scale = prompt_lr_scale
        if head_lr is not None and head_lr <= 0:
            raise ConfigError(f"model.head_lr: must be positive or null (the shared learning rate), got {head_lr}")
        self.head_lr = head_lr
        self.head_negatives = int(head_negatives)
        self.task_inference = task_inference

        self.image_in = input_projection(image_dim, self.width)
        self.text_in = input_projection(text_dim, self.width)
        self.image_prompts = PromptBank(self.width, prompt_std)
        self.text_prompts = PromptBank(self.width, prompt_std) if prompt_mode == "separate" else None
        self.attention = PromptCrossAttention(self.width, heads)
        self.task_heads = nn.ModuleList()
        self.image_fine = BranchMLP(self.width, hidden, bits)
        self.image_coarse = BranchMLP(self.width, hidden, bits)
        self.text_fine = BranchMLP(self.width, hidden, bits)
        self.text_coarse = BranchMLP(self.width, hidden, bits)
        self.mask_net = BranchMLP(self.width, hidden, bits)
        # Saved state of earlier tasks (persistent; shapes recorded by structure()).
        self.register_buffer("old_image_codes", torch.zeros(0, bits))
        self.register_buffer("old_text_codes", torch.zeros(0, bits))
        self.register_buffer("old_labels", torch.zeros(0, num_classes))
        self.register_buffer("neg_image", torch.zeros(0, image_dim))
        self.register_buffer("neg_text", torch.zeros(0, text_dim))
        # The task of each saved row and the continuous codes it had when that task ended.
        self.register_buffer("neg_tasks", torch.zeros(0, dtype=torch.long))
        self.register_buffer("neg_codes_image", torch.zeros(0, bits))
        self.register_buffer("neg_codes_text", torch.zeros(0, bits))
        # Train-set code banks of the current task (rebuilt by begin_task, not saved).
        for name in BANKS:
            self.register_buffer(f"bank_{name}", torch.zeros(0, bits), persistent=False)
        self.register_buffer("bank_labels", torch.zeros(0, num_classes), persistent=False)

    # ------------------------------------------------------------------ helpers
    @property
    def num_tasks(self) -> int:
        return len(self.task_heads)

    def _device(self) -> torch.device:
        return self.image_fine.net[0].weight.device

    def _banks(self) -> Tuple[PromptBank, PromptBank]:
        return self.image_prompts, (self.text_prompts if self.text_prompts is not None else self.image_prompts)

    def _add_task(self, random_init: bool) -> None:
        device = self._device()
        for bank in {id(b): b for b in self._banks()}.values():
            bank.add(self.prompt_length, device, random_init=random_init)
        self.task_heads.append(nn.Linear(self.width, 1).to(device))

    def _freeze_old(self, keep_last: bool) -> None:
        """Old prompts and heads never train again; the input maps train on task 0 only."""
        for bank in {id(b): b for b in self._banks()}.values():
            bank.freeze_old(keep_last=keep_last)
        n = self.num_tasks
        for i, head in enumerate(self.task_heads):
            head.requires_grad_(keep_last and i == n - 1)
        train_inputs = keep_last and n == 1
        self.image_in.requires_grad_(train_inputs)
        self.text_in.requires_grad_(train_inputs)

    def _check_task(self, task_index: int) -> None:
        if not 0 <= task_index < self.num_tasks:
            raise ValueError(f"CASH has {self.num_tasks} task(s); task index {task_index} is out of range")

    # ------------------------------------------------------------------ forward pieces
    def _pair_inputs(self, image: torch.Tensor, text: torch.Tensor, t: int) -> Dict[str, torch.Tensor]:
        """The gated, prompt-enhanced inputs ``zv``, ``zt`` of a paired batch under task
        t's prompt and head, their head logits and the pair's mask (one mask from the mean
        of both attention outputs): what every training-form output starts from."""
        xv, xt = self.image_in(image), self.text_in(text)
        head = self.task_heads[t]
        pv_bank, pt_bank = self._banks()
        gv_logit, gt_logit = head(xv), head(xt)
        av = self.attention(xv, pv_bank[t])
        at = self.attention(xt, pt_bank[t])
        return {
            "xv": xv, "xt": xt, "gv_logit": gv_logit, "gt_logit": gt_logit,
            "zv": xv + torch.sigmoid(gv_logit) * av, "zt": xt + torch.sigmoid(gt_logit) * at,
            "mask": torch.tanh(self.mask_net((av + at) / 2)),
        }

    def _pair_forward(self, image: torch.Tensor, text: torch.Tensor, t: int) -> Dict[str, torch.Tensor]:
        """The training-form forward of a paired batch (``_pair_inputs``), plus the
        cross-branch outputs used by the distillation term."""
        out = self._pair_inputs(image, text, t)
        zv, zt, m = out.pop("zv"), out.pop("zt"), out["mask"]
        # Every branch sees both modalities (its own, and the other's for distillation):
        # one call on the stacked rows [zv; zt], row by row the same function as two
        # calls, with twice the rows per matmul and one weight gradient instead of a sum
        # of two (float rounding of those gradients differs from two separate calls).
        n = zv.shape[0]
        z = torch.cat([zv, zt])
        fv, ft_x = self.image_fine(z).split(n)
        cv, ct_x = self.image_coarse(z).split(n)
        fv_x, ft = self.text_fine(z).split(n)
        cv_x, ct = self.text_coarse(z).split(n)
        out.update({
            "fv": fv, "cv": cv, "ft": ft, "ct": ct,
            "hv": select_bits(fv, cv, m), "ht": select_bits(ft, ct, m),
            "fv_x": fv_x, "cv_x": cv_x, "ft_x": ft_x, "ct_x": ct_x,
            "hv_x": select_bits(fv_x, cv_x, m), "ht_x": select_bits(ft_x, ct_x, m),
        })
        return out

    @torch.no_grad()
    def _pair_codes(self, task: "Task", t: int, chunk: int = 4096) -> Dict[str, torch.Tensor]:
        """Training-form coarse and selected codes ``cv``, ``ct``, ``hv``, ``ht`` of every
        train pair of ``task`` under task t, in eval mode: the values ``_pair_forward``
        gives, without its cross-branch outputs (half of the branch work)."""
        was_training = self.training
        self.eval()
        device = self._device()
        parts: Dict[str, List[torch.Tensor]] = {key: [] for key in ("cv", "ct", "hv", "ht")}
        train = task.train
        for start in range(0, len(train), chunk):
            sl = slice(start, start + chunk)
            out = self._pair_inputs(train.image[sl].to(device), train.text[sl].to(device), t)
            zv, zt, m = out["zv"], out["zt"], out["mask"]
            cv, ct = self.image_coarse(zv), self.text_coarse(zt)
            parts["cv"].append(cv)
            parts["ct"].append(ct)
            parts["hv"].append(select_bits(self.image_fine(zv), cv, m))
            parts["ht"].append(select_bits(self.text_fine(zt), ct, m))
        self.train(was_training)
        return {key: torch.cat(v) if v else torch.zeros(0, self.bits, device=device) for key, v in parts.items()}

    def _encode(self, modality: str, features: torch.Tensor, task_index: Optional[int]) -> torch.Tensor:
        """Eval-form encoding of one modality: the sample's own attention output drives
        its mask; the task is given or inferred from the heads."""
        if self.num_tasks == 0:
            raise RuntimeError("CASH: call begin_task before encoding (no task prompt exists yet)")
        image = modality == "image"
        x = (self.image_in if image else self.text_in)(features)
        bank = self._banks()[0 if image else 1]
        if task_index is not None:
            self._check_task(task_index)
            gate = torch.sigmoid(self.task_heads[task_index](x))
            a = self.attention(x, bank[task_index])
        else:
            logits = torch.cat([head(x) for head in self.task_heads], dim=1)
            chosen = infer_task(logits, self.task_inference)
            gate, a = self._read_tasks(x, bank, chosen, logits)
        return self._hash(image, x, gate, a)

    def _read_tasks(self, x: torch.Tensor, bank: PromptBank, chosen: torch.Tensor,
                    logits: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gate and attention output of each row under its own task ``chosen[i]``."""
        if logits is None:
            logits = torch.cat([head(x) for head in self.task_heads], dim=1)
        gate = torch.sigmoid(logits.gather(1, chosen[:, None]))
        return gate, self.attention(x, torch.stack(list(bank.prompts)), chosen)

    def _hash(self, image: bool, x: torch.Tensor, gate: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Eval-form code of one modality: ``z = x + g a`` through both branches, the
        sample's own attention output driving its mask."""
        z = x + gate * a
        fine, coarse = (self.image_fine, self.image_coarse) if image else (self.text_fine, self.text_coarse)
        return select_bits(fine(z), coarse(z), torch.tanh(self.mask_net(a)))

    def _saved_row_codes(self, rows: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Current eval-form codes of saved rows of earlier tasks (all, or ``rows``), each
        under its own task."""
        rows = torch.arange(self.neg_tasks.shape[0], device=self.neg_tasks.device) if rows is None else rows
        out = []
        for image, raw in ((True, self.neg_image), (False, self.neg_text)):
            x = (self.image_in if image else self.text_in)(raw[rows])
            gate, a = self._read_tasks(x, self._banks()[0 if image else 1], self.neg_tasks[rows])
            out.append(self._hash(image, x, gate, a))
        return out[0], out[1]

    def encode_image(self, image, task_index=None, layers=None):
        return self._encode("image", image, task_index)

    def encode_text(self, text, task_index=None, layers=None):
        return self._encode("text", text, task_index)

    def infer_tasks(self, features: torch.Tensor, modality: str) -> torch.Tensor:
        """The task each sample would be encoded with when the task is unknown."""
        x = (self.image_in if modality == "image" else self.text_in)(features)
        logits = torch.cat([head(x) for head in self.task_heads], dim=1)
        return infer_task(logits, self.task_inference)

    # ------------------------------------------------------------------ task hooks
    def begin_task(self, task: "Task", task_index: int) -> None:
        if task_index != self.num_tasks:
            raise ValueError(f"CASH.begin_task: expected task index {self.num_tasks}, got {task_index}")
        self._add_task(random_init=True)
        self._freeze_old(keep_last=True)

    def begin_epoch(self, task: "Task", task_index: int, epoch: int) -> None:
        """Fill the code banks once per task, when the model already sits on its device."""
        if self.bank_hash_image.shape[0] != len(task.train):
            self._fill_banks(task)

    def _fill_banks(self, task: "Task") -> None:
        """Code banks of the coarse loss: the current model's training-form codes of
        every train sample, refreshed batch by batch during training."""
        codes = self._pair_codes(task, self.num_tasks - 1)
        for name, key in zip(BANKS, ("cv", "ct", "hv", "ht")):
            setattr(self, f"bank_{name}", codes[key])
        self.bank_labels = task.train.labels.float().to(self._device())

    def end_task(self, task: "Task", task_index: int, store: "CodeStore") -> None:
        """Save what later tasks need: the train codes and labels of this task (exclusion
        loss) and a few raw train features (negatives of later task heads)."""
        with torch.no_grad():
            device = self._device()
            train = task.train
            codes = self._pair_codes(task, task_index)
            self.old_image_codes, self.old_text_codes = codes["hv"], codes["ht"]
            self.old_labels = train.labels.float().to(device)
            n = min(self.head_negatives, len(train))
            if n > 0:
                rows = torch.linspace(0, len(train) - 1, n, device=train.image.device).round().long()
                image, text = train.image[rows].float().to(device), train.text[rows].float().to(device)
                self.neg_image = torch.cat([self.neg_image, image])
                self.neg_text = torch.cat([self.neg_text, text])
                self.neg_tasks = torch.cat([self.neg_tasks, torch.full((n,), task_index, dtype=torch.long, device=device)])
                self.neg_codes_image = torch.cat([self.neg_codes_image, self._encode("image", image, task_index)])
                self.neg_codes_text = torch.cat([self.neg_codes_text, self._encode("text", text, task_index)])
        for name in BANKS:
            setattr(self, f"bank_{name}", torch.zeros(0, self.bits, device=self._device()))
        self.bank_labels = torch.zeros(0, self.num_classes, device=self._device())

    # ------------------------------------------------------------------ training
    def loss(self, batch: Batch, task_index: int) -> Dict[str, torch.Tensor]:
        t = task_index
        self._check_task(t)
        out = self._pair_forward(batch.image, batch.text, t)
        hv, ht, m = out["hv"], out["ht"], out["mask"]
        idx = batch.index
        if self.bank_hash_image.shape[0]:
            for name, key in zip(BANKS, ("cv", "ct", "hv", "ht")):
                bank = getattr(self, f"bank_{name}")
                bank[idx] = out[key].detach().to(bank.dtype)  # fp32 banks under bf16 autocast
            bank_labels = self.bank_labels
            banks = {name: getattr(self, f"bank_{name}") for name in BANKS}
        else:  # no bank (loss called without begin_task's train set): the batch is its own bank
            bank_labels = batch.labels
            banks = {name: out[key].detach() for name, key in zip(BANKS, ("cv", "ct", "hv", "ht"))}
        labels = batch.labels.float()
        parts: Dict[str, torch.Tensor] = {}
        parts["quant"] = sum(L.quantization_balance_loss(u) for u in (hv, ht, m))
        parts["fine"] = L.info_nce(out["fv"], out["ft"], self.temperature) + L.info_nce(hv, ht, self.temperature)
        parts["coarse"] = sum(
            L.label_similarity_mse(out[key], banks[name], labels, bank_labels)
            for name, key in zip(BANKS, ("cv", "ct", "hv", "ht"))
        )
        neg_logits = None
        if self.neg_image.shape[0]:
            head = self.task_heads[t]
            neg_logits = torch.cat([head(self.image_in(self.neg_image)), head(self.text_in(self.neg_text))])
        pos_logits = torch.cat([out["gv_logit"], out["gt_logit"]])
        if self.head_negatives:
            parts["task"] = L.task_discrimination_loss(pos_logits, neg_logits)
        else:  # the public objective, positives only
            parts["task"] = L.gate_loss(pos_logits)
        parts["distill"] = sum(
            F.mse_loss(out[a], out[a + "_x"]) for a in ("hv", "ht", "fv", "ft", "cv", "ct")
        )
        if t >= 1 and self.old_image_codes.shape[0]:
            scale = float(self.bits if self.exclusion_scale is None else self.exclusion_scale)
            target = scale * L.label_overlap(labels, self.old_labels)
            parts["exclusion"] = (
                L.inner_product_mse(hv, self.old_image_codes, target)
                + L.inner_product_mse(ht, self.old_text_codes, target)
            )
        if self.weights["consistency"] and self.neg_tasks.shape[0]:
            rows = idx.to(self.neg_tasks.device) % self.neg_tasks.shape[0]
            now_v, now_t = self._saved_row_codes(rows)
            parts["consistency"] = (F.mse_loss(now_v, self.neg_codes_image[rows])
                                    + F.mse_loss(now_t, self.neg_codes_text[rows]))
        weighted = {k: self.weights[k] * v for k, v in parts.items()}
        weighted["loss"] = sum(weighted.values())
        return weighted

    def param_groups(self, task_index: int) -> List[Dict[str, Any]]:
        """Shared nets and the newest prompt(s) at the authors' per-task learning rates
        (lr on the first task, ``later_lr_scale * lr`` afterwards; ``prompt_lr_scale``,
        when set, gives the newest prompt ``prompt_lr_scale * lr`` on every task); the
        newest head with an AdamW of its own at ``head_lr`` (null: with the nets)."""
        self._check_task(task_index)
        scale = 1.0 if task_index == 0 else self.later_lr_scale
        nets: List[nn.Parameter] = []
        for module in (self.image_fine, self.image_coarse, self.text_fine, self.text_coarse, self.mask_net, self.attention):
            nets.extend(module.parameters())
        if task_index == 0:
            nets.extend(self.image_in.parameters())
            nets.extend(self.text_in.parameters())
        prompts = [bank[task_index] for bank in {id(b): b for b in self._banks()}.values()]
        head: Dict[str, Any] = {"params": list(self.task_heads[task_index].parameters()), "name": "task_head"}
        if self.head_lr is None:
            head["lr_scale"] = scale
        else:
            head["optimizer"] = {"name": "adamw", "lr": self.head_lr, "weight_decay": 0.0}
        return [
            {"params": nets, "lr_scale": scale, "name": "nets"},
            {"params": prompts, "lr_scale": scale if self.prompt_lr_scale is None else self.prompt_lr_scale,
             "name": "prompt"},
            head,
        ]

    # ------------------------------------------------------------------ checkpoints
    def train_buffers(self) -> List[torch.Tensor]:
        """The train-set code banks ``U`` that ``loss`` refreshes batch by batch (synced
        across data-parallel ranks by the runner)."""
        return [getattr(self, f"bank_{name}") for name in BANKS]

    def structure(self) -> Dict[str, Any]:
        return {
            "bits": self.bits,
            "tasks": self.num_tasks,
            "prompt_tokens": self.image_prompts.sizes(),
            "old_codes": int(self.old_image_codes.shape[0]),
            "negatives": int(self.neg_image.shape[0]),
        }

    def build_structure(self, structure: Dict[str, Any]) -> None:
        if int(structure.get("bits", self.bits)) != self.bits:
            raise ValueError(f"CASH checkpoint has {structure['bits']} bits; this model has {self.bits}")
        if self.num_tasks:
            raise RuntimeError("CASH.build_structure needs a freshly built model")
        for tokens in structure.get("prompt_tokens", []):
            if int(tokens) != self.prompt_length:
                raise ValueError(f"CASH checkpoint prompts have {tokens} tokens; model.prompt_length is {self.prompt_length}")
        for _ in range(int(structure.get("tasks", 0))):
            self._add_task(random_init=False)
        self._freeze_old(keep_last=False)
        device = self._device()
        n_old, n_neg = int(structure.get("old_codes", 0)), int(structure.get("negatives", 0))
        self.old_image_codes = torch.zeros(n_old, self.bits, device=device)
        self.old_text_codes = torch.zeros(n_old, self.bits, device=device)
        self.old_labels = torch.zeros(n_old, self.num_classes, device=device)
        self.neg_image = torch.zeros(n_neg, self.image_dim, device=device)
        self.neg_text = torch.zeros(n_neg, self.text_dim, device=device)
        self.neg_tasks = torch.zeros(n_neg, dtype=torch.long, device=device)
        self.neg_codes_image = torch.zeros(n_neg, self.bits, device=device)
        self.neg_codes_text = torch.zeros(n_neg, self.bits, device=device)
