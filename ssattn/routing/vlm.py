"""VLM classifier: a chat model answers a multiple-choice question, read from the letter tokens' logits.

The prompt lists the classes as options "A. ...", "B. ..." (the routing
paper's four by default). Instead of generating and parsing text, one forward pass
gives the logits at the first generated position (the end of the chat
template's generation prompt; prompts are left-padded so that position is
the last one for every image of a batch); each option's score is the
log-sum-exp of the logits of the vocabulary tokens that spell its letter
("A", "\u2581A", "\u0120A", ...), and a softmax over the options gives the
probabilities. So there is never an unparseable answer, and a batch costs
one forward pass. Any image-text-to-text model of transformers whose
processor has a chat template works (the LLaVA family by default).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from ..guidance.hub import DEFAULT_CAPTIONER, from_pretrained, model_ref, require_transformers, revision_of
from .base import batches, check_batch_size, device_of, image_list, to_pil
from .classes import DESCRIPTIONS, PAPER_CLASSES, check_classes

QUESTION = "Which type of degradation does this image have?"
INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJ"
# Word-start markers of sentencepiece and byte-level BPE vocabularies.
_MARKERS = ("\u2581", "\u0120")


def letter_token_ids(tokenizer, letters) -> list[list[int]]:
    """For each letter, the ids of the vocabulary tokens that are that letter (with or without a word-start mark)."""
    vocab = tokenizer.get_vocab()
    found: list[list[int]] = [[] for _ in letters]
    index = {L: i for i, L in enumerate(letters)}
    for tok, i in vocab.items():
        t = tok
        for m in _MARKERS:
            t = t.replace(m, "")
        t = t.strip()
        if t in index:
            found[index[t]].append(int(i))
    missing = [L for L, ids in zip(letters, found) if not ids]
    if missing:
        raise ValueError(f"the tokenizer has no token for the option letters {missing}; pass letters= that it has "
                         "(one character each)")
    return [sorted(ids) for ids in found]


class VlmClassifier:
    """Probabilities over `classes` from a chat VLM's multiple-choice answer (see the module docstring)."""

    def __init__(self, model: str = DEFAULT_CAPTIONER, classes=PAPER_CLASSES, *, question: str = QUESTION,
                 descriptions: dict | None = None, instruction: str = INSTRUCTION, letters: str = LETTERS,
                 device=None, dtype=None, model_class="auto", batch_size: int = 8):
        self.classes = check_classes(classes)
        desc = dict(DESCRIPTIONS if descriptions is None else descriptions)
        missing = [c for c in self.classes if not isinstance(desc.get(c), str) or not desc[c].strip()]
        if missing:
            raise ValueError(f"descriptions has no text for classes {missing}")
        if not isinstance(letters, str) or len(set(letters)) != len(letters) or len(letters) < len(self.classes):
            raise ValueError(f"letters must be a string of at least {len(self.classes)} distinct characters, got {letters!r}")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question must be a non-empty string, got {question!r}")
        self.letters = letters[: len(self.classes)]
        self.descriptions = {c: desc[c] for c in self.classes}
        self.question, self.instruction = question, instruction
        self.batch_size = check_batch_size(batch_size)
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.model_id, self._model_class = model, model_class
        require_transformers("routing", "VLM degradation routing with a chat VLM")
        self.processor = from_pretrained("AutoProcessor", model, "VLM processor")
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(f"the processor of {model!r} has no chat template; pass a chat model's processor")
        tok = getattr(self.processor, "tokenizer", self.processor)
        tok.padding_side = "left"  # the first generated position is then the last one of every row
        self.letter_ids = letter_token_ids(tok, self.letters)
        self.settings = {"classifier": "vlm", "model": model_ref(model), "revision": revision_of(model),
                         "classes": list(self.classes), "prompt": self.prompt(), "letters": self.letters,
                         "dtype": str(self.dtype)}
        self._model = None

    @property
    def model(self):
        if self._model is None:
            cls = self._model_class
            if cls is None or cls == "auto":
                from transformers import AutoModelForImageTextToText as cls
            self._model = from_pretrained(cls, self.model_id, "VLM", dtype=self.dtype).to(self.device).eval()
        return self._model

    def prompt(self) -> str:
        """The question with its lettered options (the user's text of the chat)."""
        options = "\n".join(f"{L}. {self.descriptions[c]}" for L, c in zip(self.letters, self.classes))
        return f"{self.question}\n{options}\n{self.instruction}".rstrip()

    def chat_text(self) -> str:
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt()}]}]
        return self.processor.apply_chat_template(conv, add_generation_prompt=True)

    @torch.inference_mode()
    def first_token_logits(self, images) -> Tensor:
        """(B, V) logits at the first generated position (what greedy decoding's first step scores)."""
        imgs = image_list(images)
        text = self.chat_text()
        keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        out = []
        for sl in batches(len(imgs), self.batch_size):
            chunk = [to_pil(x) for x in imgs[sl]]
            inputs = self.processor(images=chunk, text=[text] * len(chunk), return_tensors="pt", padding=True)
            inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                      for k, v in inputs.items()}
            logits = self.model(**inputs, **({"logits_to_keep": 1} if keep else {})).logits
            out.append(logits[:, -1].float())
        return torch.cat(out)

    def __call__(self, images) -> Tensor:
        logits = self.first_token_logits(images)
        scores = torch.stack([logits[:, ids].logsumexp(-1) for ids in self.letter_ids], -1)
        return scores.softmax(-1).to(device_of(images))
