"""The captioner whose feature spaces the caption loss compares: CLIP vision -> ClipCap mapper -> GPT-2.

Three spaces (docs/operations.md section 4):

- "visual": CLIP's image embedding (B, P): `image_embeds` of
  CLIPVisionModelWithProjection (ClipCap's prefix input, 512 for ViT-B/32),
  or the pooled output (B, hidden) of a plain CLIPVisionModel;
- "prefix": the mapper's prefix embeddings (B, prefix_length, E);
- "language": GPT2Model's last hidden states over the prefix, (B, prefix_length, E);
  with caption tokens (B, T) it runs over [prefix; embeddings of the tokens]
  (teacher forcing: the same tokens in both branches) and covers all
  prefix_length + T positions, (B, prefix_length + T, E).

A captioner folder holds `captioner.json` (format, the sub-models' folders or
hub ids, the mapper's settings and weights file, normalize_prefix), written
by `save_captioner`; `load_captioner` also takes a ClipCap checkpoint file
(ssattn.caption.clipcap) or a hub id holding such a folder.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..guidance import hub
from .clipcap import expected_unused, gpt2_config, infer_mapper, load_clipcap, strip_prefixes
from .mapper import build_mapper
from .preprocess import ClipPreprocess

SPACES = ("visual", "prefix", "language")
CONFIG = "captioner.json"
FORMAT = 1
log = logging.getLogger("ssattn.caption")
DEFAULT_VISION = "openai/clip-vit-base-patch32"  # the CLIP ClipCap's public checkpoints were trained on


class Captioner(nn.Module):
    """vision (CLIPVisionModel[WithProjection]), mapper (MLPMapper / TransformerMapper), language (GPT2Model)."""

    def __init__(self, vision: nn.Module, mapper: nn.Module, language: nn.Module, preprocess: ClipPreprocess, *,
                 normalize_prefix: bool = False, source: dict | None = None):
        super().__init__()
        if hasattr(language, "transformer") and hasattr(language, "lm_head"):
            language = language.transformer  # a GPT2LMHeadModel: its GPT2Model
        self.vision, self.mapper, self.language, self.preprocess = vision, mapper, language, preprocess
        self.normalize_prefix = bool(normalize_prefix)  # ClipCap's --normalize_prefix: unit-norm CLIP embedding
        self.source = dict(source or {})
        embed = language.get_input_embeddings().weight.shape[1]
        if mapper.embed_dim != embed:
            raise ValueError(f"the mapper makes {mapper.embed_dim}-d prefix embeddings but the language model's "
                             f"embeddings are {embed}-d")
        self.eval()  # a feature extractor: no dropout (a GPT2Model built from a config starts in train mode)

    def settings(self) -> dict:
        """Everything that changes the features (for cache keys)."""
        return {"source": self.source, "mapper": self.mapper.settings(), "normalize_prefix": self.normalize_prefix,
                "preprocess": self.preprocess.settings(),
                "vision": type(self.vision).__name__, "language": type(self.language).__name__}

    def visual(self, images: Tensor) -> Tensor:
        """CLIP embedding (B, P) of images (B, 3, H, W) in [0, 1] (differentiable)."""
        out = self.vision(pixel_values=self.preprocess(images))
        emb = getattr(out, "image_embeds", None)
        return emb if emb is not None else out.pooler_output

    def prefix(self, visual: Tensor) -> Tensor:
        if self.normalize_prefix:
            visual = visual / visual.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.mapper(visual)

    def language_states(self, prefix: Tensor, tokens: Tensor | None = None) -> Tensor:
        embeds = prefix
        if tokens is not None:
            words = self.language.get_input_embeddings()(tokens.to(prefix.device))
            embeds = torch.cat((prefix, words.to(prefix.dtype)), dim=1)
        return self.language(inputs_embeds=embeds).last_hidden_state

    @torch.no_grad()
    def greedy_tokens(self, prefix: Tensor, length: int) -> Tensor:
        """`length` tokens (B, length) decoded greedily after the prefix, as ClipCap captions an image.

        GPT-2's LM head is tied to its token embeddings (ClipCap's lm_head is wte), so the
        logits are the last hidden state times wte. A fixed length, no stop token: every
        caption of a batch has the same length.
        """
        wte = self.language.get_input_embeddings()
        tokens = torch.zeros(prefix.shape[0], 0, dtype=torch.long, device=prefix.device)
        embeds = prefix
        for _ in range(int(length)):
            h = self.language(inputs_embeds=embeds).last_hidden_state[:, -1]
            nxt = (h @ wte.weight.to(h.dtype).T).argmax(dim=-1, keepdim=True)
            tokens = torch.cat((tokens, nxt), dim=1)
            embeds = torch.cat((embeds, wte(nxt).to(embeds.dtype)), dim=1)
        return tokens

    def features(self, images: Tensor, spaces=SPACES, tokens: Tensor | None = None, caption_length: int = 0) -> dict:
        """{space: features} for the requested spaces (computing only as far as the last one needs).

        caption_length > 0 without tokens: the language space runs over the prefix and the
        image's own greedy caption of that many tokens (returned under "tokens").
        """
        out = {}
        v = self.visual(images)
        out["visual"] = v
        if "prefix" in spaces or "language" in spaces:
            p = self.prefix(v)
            out["prefix"] = p
            if "language" in spaces:
                if tokens is None and caption_length > 0:
                    tokens = out["tokens"] = self.greedy_tokens(p.detach(), caption_length)
                out["language"] = self.language_states(p, tokens)
        return {s: out[s] for s in (*spaces, "tokens") if s in out}


# --------------------------------------------------------------------------- loading and saving
def _image_processor_name() -> str:
    import transformers  # the package's top level only (its classes load lazily)

    # transformers 5 names the PIL processor CLIPImageProcessorPil (CLIPImageProcessor then needs torchvision)
    return "CLIPImageProcessorPil" if hasattr(transformers, "CLIPImageProcessorPil") else "CLIPImageProcessor"


def _image_processor_class():
    import transformers

    return getattr(transformers, _image_processor_name())


def load_vision(model_id, dtype=None):
    """(vision model, ClipPreprocess) from a hub id or folder holding a CLIP vision model and its image processor."""
    processor = hub.from_pretrained(_image_processor_name(), model_id, "CLIP image processor")
    kw = {"dtype": dtype} if dtype is not None else {}
    config = hub.from_pretrained("AutoConfig", model_id, "CLIP config")
    # The projected 512-d embedding (ClipCap's input) unless the folder holds a plain CLIPVisionModel;
    # a full CLIPModel checkpoint loads into CLIPVisionModelWithProjection too.
    plain = list(getattr(config, "architectures", None) or []) == ["CLIPVisionModel"]
    cls = "CLIPVisionModel" if plain else "CLIPVisionModelWithProjection"
    vision = hub.from_pretrained(cls, model_id, "CLIP vision model", **kw)
    return vision, ClipPreprocess.from_processor(processor)


def load_language(model_id, dtype=None):
    kw = {"dtype": dtype} if dtype is not None else {}
    return hub.from_pretrained("GPT2Model", model_id, "GPT-2 language model", **kw)


def _resolve(base: Path, ref: str) -> str:
    """A sub-model reference of captioner.json: a folder relative to the captioner folder, or a hub id."""
    p = base / ref
    return str(p) if p.exists() else ref


def save_captioner(captioner: Captioner, folder, *, vision_processor=None) -> Path:
    """Write a captioner folder: vision/ (model + image processor), language/, mapper.pt, captioner.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    captioner.vision.save_pretrained(folder / "vision")
    if vision_processor is not None:
        vision_processor.save_pretrained(folder / "vision")
    captioner.language.save_pretrained(folder / "language")
    torch.save(captioner.mapper.state_dict(), folder / "mapper.pt")
    cfg = {"format": FORMAT, "vision": "vision", "language": "language", "mapper": captioner.mapper.settings(),
           "mapper_weights": "mapper.pt", "normalize_prefix": captioner.normalize_prefix}
    (folder / CONFIG).write_text(json.dumps(cfg, indent=2))
    return folder


def _load_folder(folder: Path, ref: str, dtype=None) -> Captioner:
    try:
        cfg = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"captioner {ref!r}: {CONFIG} is unreadable ({type(exc).__name__}: {exc})") from None
    if cfg.get("format") != FORMAT:
        raise ValueError(f"captioner {ref!r}: {CONFIG} has format {cfg.get('format')!r}, expected {FORMAT}")
    for key in ("vision", "language", "mapper"):
        if key not in cfg:
            raise ValueError(f"captioner {ref!r}: {CONFIG} lacks {key!r}")
    vision, pre = load_vision(_resolve(folder, cfg["vision"]), dtype)
    language = load_language(_resolve(folder, cfg["language"]), dtype)
    mapper = build_mapper(cfg["mapper"])
    if cfg.get("mapper_weights"):
        state = torch.load(folder / cfg["mapper_weights"], map_location="cpu", weights_only=True)
        mapper.load_state_dict(state)
    if dtype is not None:
        mapper.to(dtype)
    source = {"captioner": hub.model_ref(ref), "revision": hub.revision_of(ref) if not Path(ref).exists() else None}
    return Captioner(vision, mapper, language, pre, normalize_prefix=cfg.get("normalize_prefix", False), source=source)


def load_captioner(ref, *, vision=None, language=None, dtype=None, normalize_prefix: bool = False) -> Captioner:
    """A Captioner from a captioner folder, a hub id holding one, or a ClipCap checkpoint file (.pt).

    For a checkpoint file, `vision` names the CLIP model (default openai/clip-vit-base-patch32) and
    `language` optionally a GPT-2 config source (else inferred from the checkpoint); see ssattn.caption.clipcap.
    """
    if not ref or not isinstance(ref, (str, os.PathLike)):
        raise ValueError(f"captioner must be a folder, a ClipCap checkpoint file or a hub id, got {ref!r}")
    hub.require_transformers("caption", "the ClipCap-style caption regulariser (its captioner)")
    ref = os.fspath(ref)
    path = Path(ref).expanduser()
    if path.is_file():
        return captioner_from_checkpoint(path, vision=vision or DEFAULT_VISION, language=language, dtype=dtype,
                                         normalize_prefix=normalize_prefix)
    if path.is_dir():
        if not (path / CONFIG).is_file():
            raise hub.not_available("captioner", ref, FileNotFoundError(f"no {CONFIG} in {str(path)!r}"))
        return _load_folder(path, ref, dtype)
    snap = hub.snapshot(ref, "captioner")
    if not (snap / CONFIG).is_file():
        raise hub.not_available("captioner", ref, FileNotFoundError(f"the repository holds no {CONFIG}"))
    return _load_folder(snap, ref, dtype)


def captioner_from_checkpoint(path, *, vision, language=None, dtype=None, normalize_prefix: bool = False):
    """A Captioner: CLIP from `vision`, mapper and GPT-2 from the ClipCap checkpoint file at `path`."""
    import transformers

    try:
        state = strip_prefixes(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise ValueError(f"captioner checkpoint {str(path)!r} is unreadable ({type(exc).__name__}: {exc})") from None
    if "gpt.transformer.wte.weight" not in state:
        raise ValueError(f"captioner checkpoint {str(path)!r} is not a ClipCap checkpoint: no gpt.transformer.wte.weight")
    embed = state["gpt.transformer.wte.weight"].shape[1]
    mapper = build_mapper(infer_mapper(state, embed))
    gpt = transformers.GPT2Model(gpt2_config(state, language))
    v, pre = load_vision(vision, dtype)
    source = {"clipcap": hub.model_ref(path), "vision": hub.model_ref(vision), "revision": hub.revision_of(vision)}
    cap = Captioner(v, mapper, gpt, pre, normalize_prefix=normalize_prefix, source=source)
    report = load_clipcap(cap, state)
    if report.missing or [k for k in report.unused if not expected_unused(k)]:
        log.warning("%s", report)
    if dtype is not None:
        cap.mapper.to(dtype)
        cap.language.to(dtype)
    cap.clipcap_report = report
    return cap
