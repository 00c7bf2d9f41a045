"""PBEH: Prompt-driven Bit Extension Hashing for continual cross-modal retrieval.

Each task t adds a pool of ``ceil(N_train_t / prompt_divisor)`` modality-shared prompts
(``N_train_t`` counted before the validation split is carved off, as the public code
counts its whole train file). A sample reads its ``prompt_top_k`` nearest pool rows
(cosine; null = the whole pool) through its modality's cross-attention, and the hash
net of that modality encodes ``[x ; e]``:
``Linear(2w, hidden)-ReLU-Linear(hidden, hidden)-ReLU-Linear(hidden, K)`` + L2-normalise,
code ``sign``. After every task an exact majority-centre test over the stored database
codes of the newest length decides whether the next task gets ``extend_bits`` more
bits; the last layer then grows at the END (old rows copied), so every old bit keeps
its meaning and stored shorter codes are matched on their prefix.

Deviations from the public code, each on purpose:
- Attention runs on a per-sample ``(B, 1, D)`` layout, so a code never depends on the
  other samples of its batch (the public code attends across the batch).
- Attention over several prompts. With the one selected prompt as the only key and
  value (the paper's description), ``MHA(x, p, p) = W_o (W_v p + b_v) + b_o`` does not
  depend on ``x`` beyond which prompt was picked, and ``W_q``, ``W_k`` never get a
  gradient. Here a sample attends over its ``prompt_top_k`` nearest prompts of the
  pool (null, the default: the whole pool), so what it reads depends on it, as the
  paper intends a sample to read its task's prompts. ``prompt_top_k: 1`` restores the
  described single-prompt form.
- Queries of task j are encoded with task j's prompt pool (the public code used the
  newest task's pool). Task-agnostic queries (which the public code never evaluates:
  its task-agnostic validation function is never called) take the task of their
  nearest prompt among every pool seen, then read that task's pool as above;
  ``infer_tasks`` reports that choice.
- ``match_weight`` (0 = the public code, which has no such term) pulls each sample's
  nearest prompt of its task's pool towards it (``1 - cos``, as L2P's key matching),
  so prompts come to lie where their task's samples are and the nearest-prompt task
  choice of task-agnostic encoding becomes a task classifier.
- ``lwf_weight`` (0 = the public code, which has no such term): Learning without
  Forgetting on sample codes. At the start of every task after the first, a frozen copy
  of the attention and hash nets is kept (outside the module's parameters and state:
  ``begin_task`` takes it again on resume, from the same weights); each step, for every
  earlier task k, the current nets' outputs for the batch under task k's pool (first
  ``K_k`` outputs, renormalised, as the prompt anchor) are pulled towards the copy's
  (mean squared difference, averaged over the earlier tasks and summed over the
  modalities); the copy's outputs are computed once per task for every train row
  (``models/row_cache.py``), not in every step. The prompt anchor holds a few prompt
  codes per task; this term holds the codes the current samples would get under the old
  pools, which lets later tasks train at the full rate (notes/continual_methods.md).
- The supervised contrastive term counts the anchor among its own positives and in
  the denominator, as the public code does (``contrastive_self: false`` gives
  Khosla et al.'s form, anchor excluded).
- The extension test counts codes farther than K/2 from the majority centre on
  integer bits; a tied bit of the centre counts as +1 (the public code compared float
  codes with ``!=`` against a centre holding 0 for ties). ``extend_threshold: 0``
  extends after every task.
- Prompt-hash anchor: the "code of a prompt" is the hash of ``[p ; MHA(p, p, p)]``, what a
  sample lying on the prompt would get (the public code hashed ``[e ; e]``), and the
  comparison renormalises the first ``K_k`` outputs, so growing the code does not by
  itself move the anchored prefix.
- Selection uses cosine similarity (prompts and samples L2-normalised); the public
  code uses the raw inner product.
- The binary similarity term of one public version (``sign`` codes; no gradient) and
  its optional centre-separation term are not part of the method description and are
  left out; the binary half of the cosine term is kept but carries no gradient.
- Features whose width differs from ``width`` pass through a per-modality ``Linear``
  trained on the first task only (see ``models.prompts.input_projection``).
- Prompts are drawn from N(0, prompt_std^2) with ``prompt_std`` null = ``1/sqrt(width)``
  (rows of norm about 1, like the L2-normalised features this library extracts); the
  public code draws N(0, 1), i.e. rows of norm sqrt(width), which on unit-norm
  features swamps the sample in the attention output (``prompt_std: 1.0`` restores it).
- Biases of the hash nets start at zero (weights keep PyTorch's default init): with
  unit-norm features and a narrow hidden layer the default bias init dominates the
  three-layer output and every sample starts with the same code.
- Model selection happens on the task's validation split (runner), never on queries.
"""
from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from common.register import MODELS
from models import losses as L
from models.base import Batch, HashModel
from models.prompts import (
    PromptBank, PromptCrossAttention, common_width, input_projection, prompt_similarity, top_prompts, zero_biases,
)
from models.row_cache import TeacherRows
from utils.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from common.code_store import CodeStore
    from dataset.feature_set import Task


# ---------------------------------------------------------------------- extension test
def majority_centre(codes: torch.Tensor) -> torch.Tensor:
    """Bit-wise majority of {-1,+1} codes ``(N, K)`` as an int8 ``(K,)`` vector; a tie is +1."""
    sums = codes.to(torch.int64).sum(dim=0)
    return torch.where(sums >= 0, 1, -1).to(torch.int8)


def count_far_from_centre(codes: torch.Tensor) -> int:
    """How many codes lie farther than K/2 (Hamming) from their majority centre.

    Integer arithmetic only: a bit differs when the int8 values differ, and "farther
    than K/2" is ``2 d > K``."""
    if codes.shape[0] == 0:
        return 0
    codes = codes.to(torch.int8)
    centre = majority_centre(codes)
    dist = (codes != centre).sum(dim=1)
    return int((2 * dist > codes.shape[1]).sum())


def extension_fires(far: int, total: int, threshold: float) -> bool:
    """The PBEH rule: extend when more than ``threshold * total`` codes are far;
    threshold 0 extends unconditionally."""
    return threshold <= 0 or far > threshold * total


class ExtendableHashNet(nn.Module):
    """``Linear(in, hidden)-ReLU-Linear(hidden, hidden)-ReLU-Linear(hidden, K)`` + L2-norm,
    whose last layer can grow by appending output rows at the end."""

    def __init__(self, in_dim: int, hidden: int, bits: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.last = nn.Linear(hidden, bits)
        zero_biases(self)

    @property
    def bits(self) -> int:
        return int(self.last.out_features)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Outputs before normalisation; their signs are the code."""
        return self.last(self.body(z))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.logits(z), dim=1)

    @torch.no_grad()
    def extend(self, extra: int) -> None:
        """Grow the code by ``extra`` bits: rows ``[0, K)`` are copied, the new rows (at the
        end) get ``nn.Linear``'s default weights and zero biases."""
        old = self.last
        new = nn.Linear(old.in_features, old.out_features + extra).to(device=old.weight.device, dtype=old.weight.dtype)
        new.bias.zero_()
        new.weight[: old.out_features].copy_(old.weight)
        new.bias[: old.out_features].copy_(old.bias)
        self.last = new


@MODELS.register("PBEH")
class PBEH(HashModel):
    """PBEH with per-task prompt pools, per-modality attention and growing hash nets."""

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
        prompt_divisor: int = 400,
        prompt_top_k: Optional[int] = None,
        extend_bits: int = 1,
        extend_threshold: float = 0.1,
        cosine_weight: float = 0.1,
        similarity_weight: float = 100.0,
        quant_weight: float = 10.0,
        contrastive_weight: float = 1.0,
        distill_weight: float = 100.0,
        anchor_weight: float = 0.1,
        match_weight: float = 0.0,
        lwf_weight: float = 0.0,
        contrastive_self: bool = True,
        temperature: float = 0.1,
        similarity_scale: float = 16.0,
        later_lr_scale: float = 0.1,
        prompt_lr_scale: float = 1.0,
    ) -> None:
        super().__init__(image_dim, text_dim, num_classes, bits)
        self.width = common_width(image_dim, text_dim, width, heads)
        for key, value in (("width", self.width), ("hidden", hidden), ("heads", heads), ("prompt_divisor", prompt_divisor)):
            if value < 1:
                raise ConfigError(f"model.{key}: must be a positive integer, got {value}")
        if self.width % heads:
            raise ConfigError(f"model.width: {self.width} is not divisible by model.heads = {heads}")
        if prompt_top_k is not None and prompt_top_k < 1:
            raise ConfigError(f"model.prompt_top_k: must be a positive integer or null (the whole pool), got {prompt_top_k}")
        if extend_bits < 0:
            raise ConfigError(f"model.extend_bits: must be >= 0, got {extend_bits}")
        if extend_threshold < 0:
            raise ConfigError(f"model.extend_threshold: must be >= 0 (0 extends after every task), got {extend_threshold}")
        if prompt_std is not None and prompt_std <= 0:
            raise ConfigError(f"model.prompt_std: must be positive or null (1/sqrt(width)), got {prompt_std}")
        if lwf_weight < 0:
            raise ConfigError(f"model.lwf_weight: must be >= 0 (0 = no previous-model term), got {lwf_weight}")
        if temperature <= 0 or similarity_scale <= 0:
            raise ConfigError("model.temperature and model.similarity_scale must be positive")
        self.initial_bits = int(bits)
        self.prompt_divisor = int(prompt_divisor)
        self.prompt_top_k = None if prompt_top_k is None else int(prompt_top_k)
        self.contrastive_self = bool(contrastive_self)
        self.extend_bits = int(extend_bits)
        self.extend_threshold = float(extend_threshold)
        self.weights = {
            "cosine": cosine_weight, "similarity": similarity_weight, "quant": quant_weight,
            "contrastive": contrastive_weight, "distill": distill_weight, "anchor": anchor_weight,
            "match": match_weight, "lwf": lwf_weight,
        }
        self.temperature = float(temperature)
        self.similarity_scale = float(similarity_scale)
        self.later_lr_scale = float(later_lr_scale)
        self.prompt_lr_scale = float(prompt_lr_scale)

        self.image_in = input_projection(image_dim, self.width)
        self.text_in = input_projection(text_dim, self.width)
        self.prompts = PromptBank(self.width, prompt_std)
        self.image_attn = PromptCrossAttention(self.width, heads)
        self.text_attn = PromptCrossAttention(self.width, heads)
        self.image_net = ExtendableHashNet(2 * self.width, hidden, bits)
        self.text_net = ExtendableHashNet(2 * self.width, hidden, bits)
        # Task-time state that is not a tensor; structure() records it.
        self.pending_extension = False
        self.bit_history: List[int] = []
        self.extension_tests: List[Dict[str, Any]] = []
        self.anchor_bits: List[int] = []
        # The nets as they were when the current task began (lwf_weight > 0 only); a plain
        # list, so the copy is neither a submodule nor part of the checkpoint.
        self._previous: List[nn.Module] = []
        self._lwf_targets = TeacherRows()  # that copy's outputs per train row, once per task

    # ------------------------------------------------------------------ helpers
    @property
    def num_tasks(self) -> int:
        return len(self.prompts)

    def _device(self) -> torch.device:
        return self.image_net.last.weight.device

    def _check_task(self, task_index: int) -> None:
        if not 0 <= task_index < self.num_tasks:
            raise ValueError(f"PBEH has {self.num_tasks} task(s); task index {task_index} is out of range")

    def _anchor(self, k: int) -> torch.Tensor:
        return getattr(self, f"anchor_{k}")

    def _grow(self, extra: int) -> None:
        self.image_net.extend(extra)
        self.text_net.extend(extra)
        self.bits += extra

    def _freeze(self, keep_last: bool) -> None:
        self.prompts.freeze_old(keep_last=keep_last)
        train_inputs = keep_last and self.num_tasks == 1
        self.image_in.requires_grad_(train_inputs)
        self.text_in.requires_grad_(train_inputs)

    def num_prompts(self, train_size: int) -> int:
        """Prompts of a task with ``train_size`` training pairs: ``ceil(N / prompt_divisor)``."""
        return max(1, math.ceil(train_size / self.prompt_divisor))

    # ------------------------------------------------------------------ forward pieces
    def _enhance(self, x: torch.Tensor, pool: torch.Tensor, attn: PromptCrossAttention) -> torch.Tensor:
        """``[x ; MHA(x, P(x), P(x))]`` with ``P(x)`` the ``prompt_top_k`` pool rows nearest ``x``."""
        return torch.cat([x, attn(x, pool, top_prompts(x, pool, self.prompt_top_k))], dim=1)

    def _nearest_task(self, x: torch.Tensor) -> torch.Tensor:
        """Task-agnostic choice: the task owning each sample's nearest prompt, ``(B,)``."""
        pool, owner = self.prompts.stacked()
        return owner[prompt_similarity(x, pool).argmax(dim=1)]

    def _encode(self, modality: str, features: torch.Tensor, task_index: Optional[int]) -> torch.Tensor:
        if self.num_tasks == 0:
            raise RuntimeError("PBEH: call begin_task before encoding (no prompt pool exists yet)")
        image = modality == "image"
        x = (self.image_in if image else self.text_in)(features)
        attn = self.image_attn if image else self.text_attn
        if task_index is not None:
            self._check_task(task_index)
            z = self._enhance(x, self.prompts[task_index], attn)
        else:
            chosen = self._nearest_task(x)
            z = x.new_empty(x.shape[0], 2 * self.width)
            for k in chosen.unique().tolist():  # rows of one inferred task read that task's pool
                rows = chosen == k
                z[rows] = self._enhance(x[rows], self.prompts[k], attn)
        return (self.image_net if image else self.text_net)(z)

    def infer_tasks(self, features: torch.Tensor, modality: str) -> torch.Tensor:
        """The task each sample is encoded with when the task is unknown (nearest prompt)."""
        return self._nearest_task((self.image_in if modality == "image" else self.text_in)(features))

    def encode_image(self, image, task_index=None, layers=None):
        return self._encode("image", image, task_index)

    def encode_text(self, text, task_index=None, layers=None):
        return self._encode("text", text, task_index)

    def prompt_logits(self, k: int) -> torch.Tensor:
        """Un-normalised hash outputs of task k's prompts, image rows then text rows
        ``(2 n_k, bits)``: per modality, the code a sample lying on the prompt would get."""
        pool = self.prompts[k]
        zv = self._enhance(pool, pool, self.image_attn)
        zt = self._enhance(pool, pool, self.text_attn)
        return torch.cat([self.image_net.logits(zv), self.text_net.logits(zt)])

    # ------------------------------------------------------------------ task hooks
    def begin_task(self, task: "Task", task_index: int) -> None:
        """Apply a pending extension, then add this task's prompt pool."""
        if task_index != self.num_tasks:
            raise ValueError(f"PBEH.begin_task: expected task index {self.num_tasks}, got {task_index}")
        if self.pending_extension:
            self._grow(self.extend_bits)
            self.pending_extension = False
        self.prompts.add(self.num_prompts(len(task.train) + len(task.val)), self._device())
        self._freeze(keep_last=True)
        self.bit_history.append(self.bits)
        self._previous = [self._frozen_nets()] if self.weights["lwf"] and task_index >= 1 else []
        self._lwf_targets.reset(task.train if self._previous else None)

    def _frozen_nets(self) -> nn.Module:
        """A frozen copy of the attention and hash nets (the teacher of the LwF term)."""
        nets = copy.deepcopy(nn.ModuleDict({"image_attn": self.image_attn, "text_attn": self.text_attn,
                                            "image_net": self.image_net, "text_net": self.text_net}))
        nets.requires_grad_(False)
        return nets.eval()

    def end_task(self, task: "Task", task_index: int, store: "CodeStore") -> None:
        """Save this task's prompt codes (anchor) and run the extension test."""
        with torch.no_grad():
            was_training = self.training
            self.eval()
            anchor = F.normalize(self.prompt_logits(task_index), dim=1).detach().clone()
            self.train(was_training)
        self.register_buffer(f"anchor_{task_index}", anchor)
        self.anchor_bits.append(int(anchor.shape[1]))
        self.pending_extension = self.decide_extension(store, task_index)

    def decide_extension(self, store: "CodeStore", task_index: int = -1) -> bool:
        """The exact majority-centre test over the stored codes of the newest length,
        per modality; records the counts in ``extension_tests``."""
        entries = store.entries() if len(store) else []
        record: Dict[str, Any] = {"task": int(task_index), "threshold": self.extend_threshold}
        if entries:
            newest = max(e.bits for e in entries)
            same = [e for e in entries if e.bits == newest]
            total = sum(len(e) for e in same)
            record.update({"bits": int(newest), "codes": int(total)})
            fired = False
            for modality in ("image", "text"):
                far = count_far_from_centre(torch.cat([e.codes(modality) for e in same]))
                record[f"far_{modality}"] = far
                fired = fired or extension_fires(far, total, self.extend_threshold)
        else:
            fired = extension_fires(0, 0, self.extend_threshold)
        fired = fired and self.extend_bits > 0
        record["extend"] = bool(fired)
        self.extension_tests.append(record)
        return bool(fired)

    # ------------------------------------------------------------------ training
    def loss(self, batch: Batch, task_index: int) -> Dict[str, torch.Tensor]:
        t = task_index
        self._check_task(t)
        pool = self.prompts[t]
        xv, xt = self.image_in(batch.image), self.text_in(batch.text)
        zv = self._enhance(xv, pool, self.image_attn)
        zt = self._enhance(xt, pool, self.text_attn)
        # Both hash nets see both modalities (their own, and the other's for the
        # distillation term): one call per net on the stacked rows [zv; zt], row by row
        # the same function as two calls (float rounding of the weight gradients differs).
        n = zv.shape[0]
        z = torch.cat([zv, zt])
        hv, ht_x = self.image_net(z).split(n)
        hv_x, ht = self.text_net(z).split(n)
        labels = batch.labels.float()
        target = L.sigmoid_label_similarity(labels, labels, self.similarity_scale)
        parts: Dict[str, torch.Tensor] = {
            "cosine": L.cosine_alignment_loss(hv, ht),
            "similarity": L.inner_product_mse(hv, ht, target) + L.inner_product_mse(ht, hv, target),
            "quant": L.quantization_loss(hv) + L.quantization_loss(ht),
            "contrastive": L.supervised_contrastive_loss(hv, labels, self.temperature, self.contrastive_self)
            + L.supervised_contrastive_loss(ht, labels, self.temperature, self.contrastive_self),
            "distill": F.mse_loss(hv, hv_x) + F.mse_loss(ht, ht_x),
        }
        if self.weights["match"]:
            parts["match"] = sum(
                (1 - prompt_similarity(x, pool).max(dim=1).values).mean() for x in (xv, xt)
            )
        if t >= 1:
            anchor = hv.new_zeros(())
            for k in range(min(t, len(self.anchor_bits))):
                saved = self._anchor(k)
                current = F.normalize(self.prompt_logits(k)[:, : saved.shape[1]], dim=1)
                anchor = anchor + L.anchor_l1(current, saved)
            parts["anchor"] = anchor
        if self._previous and t >= 1:
            parts["lwf"] = self._lwf(batch, xv, xt, t)
        weighted = {k: self.weights[k] * v for k, v in parts.items()}
        weighted["loss"] = sum(weighted.values())
        return weighted

    def _lwf(self, batch: Batch, xv: torch.Tensor, xt: torch.Tensor, t: int) -> torch.Tensor:
        """Mean over the earlier tasks k of the squared difference between the current and
        the frozen nets' outputs for this batch under pool k (first ``K_k`` outputs,
        renormalised), both modalities. The frozen outputs are a fixed function of each
        sample within the task (the copy, the earlier pools and, from the second task on, the
        input projections are frozen), so they come from ``TeacherRows``: one pass over the train
        split per task instead of a teacher forward per step."""
        targets = self._lwf_targets(batch, lambda rows: self._lwf_teacher(rows, t))
        total = xv.new_zeros(())
        for k in range(t):
            pool, bits = self.prompts[k], self.anchor_bits[k]
            for x, attn, net, target in ((xv, self.image_attn, self.image_net, targets[2 * k]),
                                         (xt, self.text_attn, self.text_net, targets[2 * k + 1])):
                z = self._enhance(x, pool, attn)
                total = total + F.mse_loss(F.normalize(net.logits(z)[:, :bits], dim=1), target)
        return total / t

    def _lwf_teacher(self, batch: Batch, t: int) -> List[torch.Tensor]:
        """The frozen nets' renormalised first ``K_k`` outputs of the batch under each
        earlier pool k: image then text, for k = 0 .. t - 1."""
        old = self._previous[0]
        xv, xt = self.image_in(batch.image), self.text_in(batch.text)
        if old.image_net.last.weight.device != xv.device:  # the model moved after begin_task
            old.to(xv.device)
        out = []
        for k in range(t):
            pool, bits = self.prompts[k], self.anchor_bits[k]
            for x, name in ((xv, "image"), (xt, "text")):
                z_old = self._enhance(x, pool, old[f"{name}_attn"])
                out.append(F.normalize(old[f"{name}_net"].logits(z_old)[:, :bits], dim=1))
        return out

    def param_groups(self, task_index: int) -> List[Dict[str, Any]]:
        """Hash nets and attention at ``lr`` on the first task and ``later_lr_scale * lr``
        afterwards; the newest prompt pool at ``prompt_lr_scale * lr`` (the authors' 1e-4
        for task 1, then 1e-5 for the nets and 1e-4 for the prompt)."""
        self._check_task(task_index)
        nets: List[nn.Parameter] = []
        for module in (self.image_attn, self.text_attn, self.image_net, self.text_net):
            nets.extend(module.parameters())
        if task_index == 0:
            nets.extend(self.image_in.parameters())
            nets.extend(self.text_in.parameters())
        return [
            {"params": nets, "lr_scale": 1.0 if task_index == 0 else self.later_lr_scale, "name": "nets"},
            {"params": [self.prompts[task_index]], "lr_scale": self.prompt_lr_scale, "name": "prompt"},
        ]

    # ------------------------------------------------------------------ checkpoints
    def structure(self) -> Dict[str, Any]:
        return {
            "bits": self.bits,
            "tasks": self.num_tasks,
            "prompt_sizes": self.prompts.sizes(),
            "bit_history": list(self.bit_history),
            "anchor_bits": list(self.anchor_bits),
            "pending_extension": bool(self.pending_extension),
            "extension_tests": [dict(r) for r in self.extension_tests],
        }

    def build_structure(self, structure: Dict[str, Any]) -> None:
        if self.num_tasks:
            raise RuntimeError("PBEH.build_structure needs a freshly built model")
        bits = int(structure.get("bits", self.bits))
        if bits < self.bits:
            raise ValueError(f"PBEH checkpoint has {bits} bits, fewer than model.bits = {self.bits}")
        if bits > self.bits:
            self._grow(bits - self.bits)
        device = self._device()
        for n in structure.get("prompt_sizes", []):
            self.prompts.add(int(n), device, random_init=False)
        self._freeze(keep_last=False)
        self.anchor_bits = [int(b) for b in structure.get("anchor_bits", [])]
        for k, b in enumerate(self.anchor_bits):
            self.register_buffer(f"anchor_{k}", torch.zeros(2 * self.prompts.sizes()[k], b, device=device))
        self.bit_history = [int(b) for b in structure.get("bit_history", [])]
        self.pending_extension = bool(structure.get("pending_extension", False))
        self.extension_tests = [dict(r) for r in structure.get("extension_tests", [])]
