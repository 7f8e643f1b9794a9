"""`pretrain zero-shot`: how well a CLIP classifies images it was never trained to classify, and how well it retrieves.

    pretrain zero-shot --ckpt runs/clip-smoke/checkpoints/last.ckpt --data data/shapes

Each class name is put into every prompt template ("a photo of a {}."), the prompts are encoded by the text tower and
averaged per class (Radford et al. 2021, section 3.1.4); an image's class is the one whose embedding is closest to its
own. Reads the val split of image shards (`pretrain prepare-images`); with captions, also image->text and text->image
recall@1/5/10 over the split.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from framework.errors import UserError

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


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="pretrain zero-shot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from framework.generate import add_model_arguments, load_model

    add_model_arguments(p, "a CLIP")
    p.add_argument("--data", required=True, help="image shards written by `pretrain prepare-images` (its val split)")
    p.add_argument("--template", action="append", dest="templates",
                   help="a prompt with {} for the class name (repeat for an ensemble; default: the templates the "
                        "checkpoint was validated with, else 'a {}.', 'a photo of a {}.', 'a picture of a {}.')")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    from framework.checkpoint.formats import trust_checkpoint
    from framework.data.images import ImageDataModule

    trust_checkpoint(args.trust_checkpoint)
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    model, tok = load_model(args.ckpt, args.model, args.tokenizer, model_type="clip")
    templates = args.templates
    if templates is None and args.ckpt is not None:
        from framework.checkpoint.consolidate import checkpoint_meta

        templates = checkpoint_meta(args.ckpt).get("hyper_parameters", {}).get("zero_shot_templates")
    templates = check_templates(list(templates or DEFAULT_TEMPLATES), "--template")
    image = model.config.image
    dm = ImageDataModule(path=args.data, image_size=int(image.get("image_size", 224)), batch_size=args.batch_size,
                         num_workers=0, captions=True, max_caption_tokens=model.config.text["seq_len"] - 2)
    dm.setup("validate")
    names = dm.class_names if dm.has_labels else []
    model.to(args.device)
    results = evaluate(model, tok, dm.val_dataloader(), names, templates, args.device)
    print(f"{int(results.pop('images')):,} val images of '{args.data}', {len(templates)} prompt template(s)")
    if "zero_shot_top1" in results:
        chance = results.pop("chance")
        print(f"zero-shot top-1: {results['zero_shot_top1']:.2%}   top-5: {results.get('zero_shot_top5', 0):.2%}   "
              f"over {len(names)} classes (chance {chance:.2%}, top-1 is {results['zero_shot_top1'] / chance:.1f}x)")
    else:
        print("zero-shot: the val images carry no classes (prepare them with a folder per class)")
    recalls = {k: v for k, v in results.items() if "R@" in k}
    if recalls:
        print("retrieval: " + "   ".join(f"{k} {v:.2%}" for k, v in recalls.items()))
