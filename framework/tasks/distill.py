"""Knowledge distillation: a student learns its task and, at once, a frozen teacher's distribution over the same outputs.

One mixin, `Distillation`, over any task whose measures come from per-row logits (PretrainTask.scored_logits): the
teacher is run on the same batch through the task's own `scored_logits`, so it scores exactly the rows the task does
(every next token for a GPT, the masked positions for an encoder, each image or document for a classifier). The loss
(framework.objectives.distill) is `alpha * T^2 * KL + (1 - alpha) * task loss`; `loss` is that mix, `task_loss` the
task's own (what val/ppl and a comparison with a model trained without a teacher read), `kl` the distillation term
and `agreement` how often the student's top-1 output is the teacher's; validation adds the teacher's own
`teacher_loss` (cross-entropy, without label smoothing) and `teacher_accuracy` on the same rows.

The teacher is an auxiliary frozen model (PretrainTask.aux_models): any checkpoint of `pretrain fit` (any strategy)
or a `pretrain export` directory, loaded frozen, on every strategy (sharded like the student under FSDP2 and ZeRO-3),
never in the optimizer or a checkpoint (which records its path and fingerprint; a changed teacher refuses a resume).
It must speak the student's output space: the same family and tokenizer for a language model, the same classes for
a classifier; a mismatch is refused in one line before anything is built. Without a teacher the task trains as its
base task does, which is how the same config gives the from-scratch baseline.

To start the student from the teacher's weights (DistilBERT keeps one layer in two), use
`model.init_from: TEACHER` with `model.init_layers: [0, 2, ...]` (framework.checkpoint.init_from).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from framework.errors import UserError
from framework.objectives.distill import (KL_DIRECTIONS, agreement, distillation_loss, kl_rows, masked_mean,
                                          top_k_kl_rows, top_k_of)
from framework.tasks.base import Measures
from framework.tasks.causal_lm import CausalLMTask
from framework.tasks.classification import ClassificationTask
from framework.tasks.masked_lm import MaskedLMTask
from framework.tasks.vision import ImageClassificationTask

IGNORE = -100  # a row the task does not score (tasks' IGNORE_INDEX / IGNORE_LABEL)


class Distillation:
    """Adds a teacher to a task (the mixin of the Distilled* tasks below). Args, as `--model.NAME`:

    teacher: the teacher's checkpoint or export; unset: no teacher, the base task alone.
    alpha: the weight of the distillation term (1: the teacher alone; 0: the task alone).
    temperature: T of the softened softmaxes (Hinton et al. 2015); the KL term is scaled by T^2.
    kl: `forward` KL(teacher || student), mass-covering, the default; `reverse` KL(student || teacher),
        mode-seeking (MiniLLM).
    kl_chunk: vocabulary chunk of the KL's float32 pass (memory, not results).
    top_k: distil from the teacher's k most likely outputs only (plus the mass of the rest as one bucket: the
        coarsened KL of framework.objectives.distill.top_k_kl_rows); what an offline cache holds, so an online run
        with the same k gives the same loss. Forward KL only.

    hidden_weight: weight of DistilBERT's cosine loss between the student's and the teacher's final hidden states
        (after the last LayerNorm) at the scored rows, added to the loss (0: off). Language students with the
        teacher's width (DistilBERT keeps the width and halves the depth); an online teacher.

    Offline teacher: with `data.teacher_cache DIR` (`pretrain distill-cache`; causal LM) the train batches carry the
    teacher's cached top-k rows and the KL is computed from them: no teacher needs to be in memory (`teacher` may
    then be left unset; when set, it is still used for validation's measures).
    """

    aux_models = {"teacher": "teacher"}
    likelihood = "task_loss"
    aux: dict[str, Any]

    def __init__(self, *, teacher: str | None = None, alpha: float = 0.5, temperature: float = 2.0,
                 kl: str = "forward", kl_chunk: int = 8192, top_k: int | None = None, hidden_weight: float = 0.0,
                 **kwargs: Any):
        super().__init__(**kwargs)
        if not 0 <= alpha <= 1 or temperature <= 0 or kl not in KL_DIRECTIONS or kl_chunk < 1:
            raise UserError(f"model.alpha must be in [0, 1], model.temperature > 0, model.kl one of "
                            f"{', '.join(KL_DIRECTIONS)} and model.kl_chunk >= 1; got {alpha}, {temperature}, "
                            f"{kl!r}, {kl_chunk}")
        if top_k is not None and (top_k < 1 or kl != "forward"):
            raise UserError(f"model.top_k must be >= 1 and needs model.kl=forward; got {top_k}, {kl!r}")
        self.teacher, self.alpha, self.temperature, self.kl, self.kl_chunk = teacher, alpha, temperature, kl, kl_chunk
        if hidden_weight < 0:
            raise UserError(f"model.hidden_weight must be >= 0, got {hidden_weight}")
        self.top_k, self.hidden_weight = top_k, hidden_weight

    def setup(self, stage: str) -> None:
        if self.teacher is not None:
            from framework.checkpoint.init_from import source_config

            self._aux_path("teacher")  # type: ignore[attr-defined]  # a missing path: one line
            # why the teacher (its model config) cannot teach this task on this data: each task's own check
            problem = self.teacher_problem(source_config(self.teacher), self.datamodule())  # type: ignore[attr-defined]
            if problem:
                raise UserError(f"model.teacher '{self.teacher}' {problem}")
            if self.hidden_weight > 0:
                self._check_hidden(source_config(self.teacher))
        cache = getattr(self.datamodule(), "teacher_cache_meta", None)  # type: ignore[attr-defined]
        if self.hidden_weight > 0 and (self.teacher is None or cache is not None):
            raise UserError("model.hidden_weight compares hidden states with a teacher in memory: set model.teacher "
                            "and leave data.teacher_cache unset")
        if cache is not None and cache["temperature"] != self.temperature:
            raise UserError(f"the teacher cache holds log-probabilities at temperature {cache['temperature']} but "
                            f"model.temperature is {self.temperature}; use the same (or write a cache for it)")
        super().setup(stage)  # type: ignore[misc]  # builds the teacher

    def _check_hidden(self, teacher: dict[str, Any]) -> None:
        if not hasattr(self, "scored_hidden"):
            raise UserError(f"model.hidden_weight is for language students (GPT, encoder), not {type(self).__name__}")
        width = self.model_class.config_class.from_preset(self.preset, **self.overrides).n_embd  # type: ignore
        if teacher.get("n_embd") != width:
            raise UserError(f"model.hidden_weight needs the teacher's width ({teacher.get('n_embd')}) to be the "
                            f"student's ({width}); set model.config.n_embd={teacher.get('n_embd')} or "
                            "model.hidden_weight=0")

    def compute_losses(self, batch: dict[str, Any]) -> Measures:
        hidden: list[torch.Tensor] = []
        with _final_hidden(self.model if self.hidden_weight > 0 else None, hidden):  # type: ignore[attr-defined]
            logits, targets = self.scored_logits(self, batch)  # type: ignore[attr-defined]
        measures = self.measures(logits, targets, batch)  # type: ignore[attr-defined]
        task, task_count = measures["loss"]
        measures["task_loss"] = (task.detach(), task_count)
        teacher = None
        if "teacher_ids" in batch:  # an offline cache's top-k rows, (B, T, k) in the order of the scored rows
            ids, logprobs = batch["teacher_ids"].flatten(0, -2), batch["teacher_logprobs"].flatten(0, -2)
            rows = top_k_kl_rows(logits, ids, logprobs, temperature=self.temperature, chunk=self.kl_chunk)
            top1 = (logits.detach().argmax(-1) == ids[:, 0]).float()
        elif "teacher" in self.aux:
            with _final_hidden(self.aux["teacher"] if hidden else None, hidden):
                teacher, _ = self.scored_logits(self.aux["teacher"], batch)  # type: ignore[attr-defined]  # no grad
            if self.top_k is not None:
                ids, logprobs = top_k_of(teacher, self.top_k, self.temperature)
                rows = top_k_kl_rows(logits, ids, logprobs, temperature=self.temperature, chunk=self.kl_chunk)
            else:
                rows = kl_rows(logits, teacher, temperature=self.temperature, direction=self.kl, chunk=self.kl_chunk)
            top1 = agreement(logits, teacher)
        else:
            return measures
        scored = targets != IGNORE
        kl, count = masked_mean(rows, scored)
        loss = distillation_loss(kl, task, alpha=self.alpha, temperature=self.temperature)
        agree, _ = masked_mean(top1, scored)
        out = {**measures, "loss": (loss, task_count), "kl": (kl.detach(), count), "agreement": (agree, count)}
        if len(hidden) == 2:  # DistilBERT's cosine term, on the same rows
            pair = [self.scored_hidden(h, batch).float() for h in hidden]  # type: ignore[attr-defined]  # (N, C)
            cos, _ = masked_mean(1 - F.cosine_similarity(pair[0], pair[1], dim=-1), scored)
            out["loss"] = (loss + self.hidden_weight * cos, task_count)
            out["hidden_cos"] = (cos.detach(), count)
        if not self.training and teacher is not None:  # how far the student is from its teacher, on the val rows
            teacher = teacher.float()
            ce = F.cross_entropy(teacher, targets, ignore_index=IGNORE, reduction="sum") / count.clamp(min=1)
            right, _ = masked_mean((teacher.argmax(-1) == targets).float(), scored)
            out.update(teacher_loss=(ce, count), teacher_accuracy=(right, count))
        return out

    def summary_lines(self) -> list[str]:
        metrics = self.trainer.callback_metrics  # type: ignore[attr-defined]
        if self.teacher is None or "val/kl" not in metrics:
            return super().summary_lines()  # type: ignore[misc]
        return [f"teacher: {self.teacher}   val/kl: {float(metrics['val/kl']):.4f}   val/agreement (top-1): "
                f"{float(metrics['val/agreement']):.2%}", *super().summary_lines()]  # type: ignore[misc]


@contextmanager
def _final_hidden(model: Any, out: list[torch.Tensor]) -> Iterator[None]:
    """Append the output of `model`'s final LayerNorm (`transformer.ln_f`: hidden states (B, T, C)) to `out` while
    the block runs; nothing when `model` is None. Reaches through the teacher's wrappers (Frozen, a DeepSpeed
    engine)."""
    if model is None:
        yield
        return
    while not hasattr(model, "transformer") and hasattr(model, "module"):
        model = model.module
    handle = model.transformer.ln_f.register_forward_hook(lambda module, args, output: out.append(output))
    try:
        yield
    finally:
        handle.remove()


def _tokenizer_problem(teacher_path: str, datamodule: Any) -> str | None:
    from framework.checkpoint.init_from import source_tokenizer
    from framework.data.tokenizer import Tokenizer, load_tokenizer, same_tokenizer

    text = source_tokenizer(teacher_path)
    if text is not None and not same_tokenizer(Tokenizer.from_str(text), load_tokenizer(datamodule.tokenizer_path)):
        return (f"was trained with another tokenizer than the data at '{datamodule.path}': its token ids mean other "
                f"tokens; prepare the data with `pretrain prepare --tokenizer {teacher_path} ...`")
    return None


class _LanguageTeacher:
    """A language-model teacher: the student's family, vocabulary and tokenizer."""

    def teacher_problem(self, teacher: dict[str, Any], datamodule: Any) -> str | None:
        from framework.models.registry import model_type_of

        family = self.model_class.config_class.model_type  # type: ignore[attr-defined]
        found = model_type_of(teacher)
        if found != family:
            return f"holds a {found!r} model; a {family!r} student needs a {family!r} teacher"
        student = self.overrides.get("vocab_size") or (datamodule.vocab_size if datamodule is not None else None)
        if student is not None and teacher.get("vocab_size") != student:  # logits must line up id for id
            return (f"has {teacher.get('vocab_size')} output tokens but the student has {student}; use the teacher's "
                    f"tokenizer and set model.config.vocab_size={teacher.get('vocab_size')}")
        return _tokenizer_problem(self.teacher, datamodule) if datamodule is not None else None  # type: ignore


class DistilledCausalLMTask(Distillation, _LanguageTeacher, CausalLMTask):
    """A GPT student on packed token windows, taught every next-token distribution by a GPT teacher of the same
    tokenizer (any size). configs/distill/smoke.yaml. Args: Distillation's, then CausalLMTask's."""

    def scored_hidden(self, hidden: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return hidden.flatten(0, 1)  # (B, T, C) -> (B*T, C): every position is scored


class DistilledMaskedLMTask(Distillation, _LanguageTeacher, MaskedLMTask):
    """An encoder student (DistilBERT-style), taught the teacher encoder's distribution at each masked position.
    configs/distill/bert.yaml. Args: Distillation's, then MaskedLMTask's."""

    def scored_hidden(self, hidden: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return hidden[batch["labels"] != IGNORE]  # (M, C): the masked positions, in the order of their logits


class _ClassTeacher:
    """A classifier teacher: a model of this task's kind with the data's classes."""

    def teacher_problem(self, teacher: dict[str, Any], datamodule: Any) -> str | None:
        classes = teacher.get("num_classes")
        if not classes:
            return (f"holds a {teacher.get('model_type')!r} model without a classification head; pass a classifier "
                    "trained on these classes")
        if datamodule is not None and classes != datamodule.num_classes:
            return f"predicts {classes} classes but the data has {datamodule.num_classes}"
        names = teacher.get("class_names")
        if datamodule is not None and names and list(names) != list(datamodule.class_names):
            return "was trained on other class names (or another order) than the data's"
        return None


class DistilledImageTask(Distillation, _ClassTeacher, ImageClassificationTask):
    """An image classifier student (ResNet or ViT) taught by any image classifier of the same classes (DeiT's CNN
    teacher for a ViT student, or a larger network of the same kind). configs/distill/vision.yaml."""

    def teacher_problem(self, teacher: dict[str, Any], datamodule: Any) -> str | None:
        from framework.models.registry import image_models

        if teacher.get("model_type") not in image_models():
            return f"holds a {teacher.get('model_type')!r} model; pass an image classifier ({', '.join(image_models())})"
        if (teacher["model_type"] == "vit" and datamodule is not None
                and teacher.get("image_size") != datamodule.image_size):
            return (f"is a ViT of {teacher.get('image_size')} px images but data.image_size is "
                    f"{datamodule.image_size}; set data.image_size={teacher.get('image_size')}")
        return super().teacher_problem(teacher, datamodule)


class DistilledClassificationTask(Distillation, _ClassTeacher, ClassificationTask):
    """A sequence classifier student taught by a fine-tuned sequence classifier of the same classes and tokenizer."""

    def teacher_problem(self, teacher: dict[str, Any], datamodule: Any) -> str | None:
        if teacher.get("model_type") != "classifier":
            return f"holds a {teacher.get('model_type')!r} model; pass a fine-tuned sequence classifier"
        problem = super().teacher_problem(teacher, datamodule)
        if problem is None and datamodule is not None:
            problem = _tokenizer_problem(self.teacher, datamodule)  # type: ignore[attr-defined]
        return problem


__all__ = ["Distillation", "DistilledCausalLMTask", "DistilledMaskedLMTask", "DistilledImageTask",
           "DistilledClassificationTask"]
