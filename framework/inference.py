"""What a trained model does after training, as library calls: fill the masks of a text with a masked-LM encoder,
and classify images zero-shot (and measure retrieval) with a CLIP. The `pretrain fill-mask` and `zero-shot`
commands, the run summary and the CLIP task's validation use them.

Zero-shot: each class name is put into every prompt template ("a photo of a {}."), the prompts are encoded by the
text tower and averaged per class (Radford et al. 2021, section 3.1.4); an image's class is the one whose embedding
is closest to its own.
"""

from __future__ import annotations

from typing import Any

import torch

from framework.data.tokenizer import Tokenizer
from framework.errors import UserError
from framework.models.encoder import Encoder

MASK = "<|mask|>"


@torch.no_grad()
def fill_mask(model: Encoder, ids: list[int], mask_id: int, top_k: int) -> list[list[tuple[int, float]]]:
    """For each mask position of `ids` (in order): the top_k (token id, probability) pairs. Runs in eval mode (no
    dropout) and restores the model's mode."""
    was_training = model.training
    model.eval()
    try:
        idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
        predict = idx == mask_id  # (1, T)
        probs = model(idx, predict=predict).float().softmax(dim=-1)  # (M, V)
    finally:
        model.train(was_training)
    top = probs.topk(min(top_k, probs.size(-1)), dim=-1)
    return [list(zip(i.tolist(), p.tolist())) for i, p in zip(top.indices, top.values)]


def encode_with_masks(tok: Tokenizer, text: str) -> list[int]:
    """`<|cls|>` + the text's ids with a mask id for each MASK. The text between masks is encoded piece by piece: a
    BPE tokenizer must not merge across a mask."""
    specials = tok.special_ids
    pieces = text.split(MASK)
    ids = [specials["cls"]]
    for i, piece in enumerate(pieces):
        ids += tok.encode(piece) if piece else []
        if i < len(pieces) - 1:
            ids.append(specials["mask"])
    return ids


def show(model: Encoder, tok: Tokenizer, text: str, top_k: int) -> list[str]:
    """Lines: the top_k guesses for each mask, then the text with the best guesses filled in."""
    ids = encode_with_masks(tok, text)
    mask_id = tok.special_ids["mask"]
    results = fill_mask(model, ids, mask_id, top_k)
    lines = [f"mask {n}: " + "   ".join(f"{tok.decode([t])!r} {p:.1%}" for t, p in candidates)
             for n, candidates in enumerate(results, 1)]
    best = iter([c[0][0] for c in results])
    lines.append(f"best: {tok.decode([next(best) if t == mask_id else t for t in ids[1:]])}")
    return lines


DEFAULT_TEMPLATES = ("a {}.", "a photo of a {}.", "a picture of a {}.")


def encode_prompts(tok: Any, class_names: list[str], templates: list[str], max_tokens: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (K*T, L) padded with the pad token, and their lengths, of every class x template prompt
    (class-major), each truncated to max_tokens."""
    rows = [tok.encode(t.format(name))[:max_tokens] for name in class_names for t in templates]
    pad = tok.special_ids.get("pad", 0)
    lengths = torch.tensor([max(1, len(r)) for r in rows])
    tokens = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return tokens, lengths


def check_templates(templates: list[str], option: str) -> list[str]:
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise UserError(f"{option} must each hold one '{{}}' where the class name goes; {bad[0] if bad else []!r} "
                        "does not")
    return list(templates)


@torch.no_grad()
def evaluate(model: Any, tok: Any, batches: Any, class_names: list[str], templates: list[str],
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Zero-shot top-1/top-5 (when the images carry classes) and retrieval recall (when they carry captions) of a
    CLIP over `batches` (ImageDataModule val batches), in one process."""
    from framework.objectives.contrastive import retrieval_recall, zero_shot_accuracy, zero_shot_classifier

    model.eval()
    images, texts, labels = [], [], []
    for batch in batches:
        valid = batch["valid"]
        tokens = batch.get("tokens")
        img, txt, _ = model(batch["images"].to(device), None if tokens is None else tokens.to(device),
                            None if tokens is None else batch["lengths"].to(device))
        images.append(img.float()[valid.to(device)])
        if txt is not None:
            texts.append(txt.float()[valid.to(device)])
        labels.append(batch["labels"][valid].to(device))
    if not images:
        raise UserError("the val split holds no images; prepare the shards with a val split (--val-fraction)")
    img, lab = torch.cat(images), torch.cat(labels)
    results: dict[str, float] = {"images": float(len(img))}
    if texts:
        results.update({k: float(v) for k, v in retrieval_recall(img, torch.cat(texts)).items()})
    if class_names and bool((lab >= 0).all()):
        prompt, lengths = encode_prompts(tok, class_names, templates, model.config.text["seq_len"] - 2)
        _, class_text, _ = model(None, prompt.to(device), lengths.to(device))
        classifier = zero_shot_classifier(class_text.float().view(len(class_names), len(templates), -1))
        results.update({f"zero_shot_{k}": float(v) for k, v in zero_shot_accuracy(img, classifier, lab).items()})
        results["chance"] = 1 / len(class_names)
    return results
