"""PRM input formats: how a process reward model reads a search, built one step at a time.

A format turns a question and a chain's steps into the PRM's own token stream, incrementally:

    fmt.prompt_ids(question)        -> the PRM's tokens before the first step (its template around the question)
    fmt.step_ids(step, index)       -> the PRM's tokens of step `index` (0-based), separator included
    fmt.encode(question, steps)     -> (all the tokens, the position of each step's score): what re-encoding reads

Every step's score is read at the LAST token of its step_ids (the separator, or the step's own last token), so an
incremental scorer reads one hidden row per new step and `encode` is exactly the concatenation of the pieces: the
full re-encode a searcher would run equals the incremental stream token for token.

Formats shipped:
  QwenMathPRM   Qwen2.5-Math-PRM: chat template (system prompt, user question, assistant turn), each step stripped and
                followed by "<extra_0>"; its head (score.0 Linear(H, H) -> ReLU -> score.2 Linear(H, 2)) is the
                model's reward head, reward = softmax class 1.
  MathShepherd  question + " ", each step (after the first on a new line) followed by " ки"; reward =
                P("+") of the pair ("+", "-") of LM-head rows = sigmoid(logit_+ - logit_-) at the tag.
  SkyworkPRM    bos + question + "\\n", each step (its trailing step token removed) tokenized on its own, then the
                step token ("\\n"); value head Linear(H, 1) + sigmoid at the step token (the model's reward head).
  RewardHeadFormat  no template: the prompt and steps as they come (token ids, or text with a tokenizer), optional
                separator after each step; the model's reward head (our checkpoints' o1kernels_reward_head), or
                two LM-head rows (token_pair).

Tokenizer: the PRM's own (a transformers tokenizer, a tokenizers.Tokenizer, or any object whose encode(text) returns
ids), or None for RewardHeadFormat reading the policy's token ids. With a tokenizer a step is text and is tokenized on
its own, at its step boundary, so a policy with another vocabulary can be scored (decode its step, hand the text).
Bad input raises ValueError / TypeError naming the argument.
"""
from __future__ import annotations

import math

QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _encoder(tokenizer):
    """text -> token ids without special tokens added, for a transformers tokenizer, a tokenizers.Tokenizer or an
    object whose encode(text) returns ids."""
    if hasattr(tokenizer, "convert_tokens_to_ids"):  # transformers
        return lambda text: list(tokenizer.encode(text, add_special_tokens=False))
    if hasattr(tokenizer, "token_to_id"):  # tokenizers.Tokenizer
        return lambda text: list(tokenizer.encode(text, add_special_tokens=False).ids)
    if callable(getattr(tokenizer, "encode", None)):
        return lambda text: list(tokenizer.encode(text))
    raise TypeError(f"tokenizer must be a transformers tokenizer, a tokenizers.Tokenizer or have encode(text) -> ids, "
                    f"got {type(tokenizer).__name__}")


class PRMFormat:
    """Base of the formats (see the module docstring). token_pair: (positive_id, negative_id) LM-head rows the
    reward reads, or None for the model's reward head. reads_text: whether question and steps are text (else ids)."""

    token_pair: tuple[int, int] | None = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._encode = None if tokenizer is None else _encoder(tokenizer)
        self.reads_text = tokenizer is not None

    def _one_token(self, text: str, name: str) -> int:
        ids = self._encode(text)
        if len(ids) != 1:
            raise ValueError(f"{name} {text!r} is {len(ids)} tokens {ids[:8]} of the PRM's tokenizer, not one")
        return ids[0]

    def _check(self, name: str, value):
        if self.reads_text:
            if not isinstance(value, str):
                raise TypeError(f"{name} must be text (this format tokenizes with the PRM's tokenizer), got "
                                f"{type(value).__name__}")
        elif isinstance(value, str) or not hasattr(value, "__iter__") or not all(_is_int(t) for t in value):
            raise TypeError(f"{name} must be a list of token ids (this format has no tokenizer), got "
                            f"{type(value).__name__}")
        return value

    def prompt_ids(self, question) -> list[int]:
        raise NotImplementedError

    def step_ids(self, step, index: int) -> list[int]:
        raise NotImplementedError

    def _step_index(self, index) -> int:
        if not _is_int(index) or index < 0:
            raise ValueError(f"index must be a step number >= 0, got {index!r}")
        return index

    def encode(self, question, steps) -> tuple[list[int], list[int]]:
        """(the PRM's tokens of question + steps, the position of each step's score): the full re-encode."""
        ids = self.prompt_ids(question)
        positions = []
        for i, step in enumerate(steps):
            ids += self.step_ids(step, i)
            positions.append(len(ids) - 1)
        return ids, positions


class QwenMathPRM(PRMFormat):
    """Qwen2.5-Math-PRM: chat template with `system`, steps stripped and each followed by `separator`."""

    def __init__(self, tokenizer, *, system: str = QWEN_SYSTEM, separator: str = "<extra_0>"):
        if tokenizer is None:
            raise ValueError("tokenizer: QwenMathPRM needs the PRM's tokenizer (its template is text)")
        super().__init__(tokenizer)
        self.system = system
        self.separator_id = self._one_token(separator, "separator")
        self.separator = separator

    def prompt_ids(self, question) -> list[int]:
        q = self._check("question", question)
        return self._encode(f"<|im_start|>system\n{self.system}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
                            "<|im_start|>assistant\n")

    def step_ids(self, step, index: int) -> list[int]:
        self._step_index(index)
        return self._encode(self._check("step", step).strip()) + [self.separator_id]


class MathShepherd(PRMFormat):
    """Math-Shepherd: question + " ", steps on their own lines each ending " " + tag; reward P(positive) of the
    (positive, negative) LM-head rows at the tag."""

    def __init__(self, tokenizer, *, tag: str = "ки", positive: str = "+", negative: str = "-"):
        if tokenizer is None:
            raise ValueError("tokenizer: MathShepherd needs the PRM's tokenizer")
        super().__init__(tokenizer)
        self.tag_id = self._one_token(tag, "tag")
        self.token_pair = (self._one_token(positive, "positive"), self._one_token(negative, "negative"))

    def prompt_ids(self, question) -> list[int]:
        return self._encode(self._check("question", question) + " ")

    def step_ids(self, step, index: int) -> list[int]:
        lead = "\n" if self._step_index(index) else ""
        return self._encode(lead + self._check("step", step).strip() + " ") + [self.tag_id]


class SkyworkPRM(PRMFormat):
    """Skywork-o1-Open-PRM: [bos] + question + "\\n", each step tokenized on its own (its trailing step token
    removed) then the step token; value head at the step token."""

    def __init__(self, tokenizer, *, step_token: str = "\n", bos_id: int | None = None):
        if tokenizer is None:
            raise ValueError("tokenizer: SkyworkPRM needs the PRM's tokenizer")
        super().__init__(tokenizer)
        self.step_token = step_token
        self.step_token_id = self._one_token(step_token, "step_token")
        bos_id = getattr(tokenizer, "bos_token_id", None) if bos_id is None else bos_id
        if not _is_int(bos_id) or bos_id < 0:
            raise ValueError(f"bos_id: the tokenizer has no bos token, give bos_id (a token id), got {bos_id!r}")
        self.bos_id = bos_id

    def prompt_ids(self, question) -> list[int]:
        return [self.bos_id] + self._encode(self._check("question", question) + "\n")

    def step_ids(self, step, index: int) -> list[int]:
        self._step_index(index)
        text = self._check("step", step)
        if text.endswith(self.step_token):
            text = text[:-len(self.step_token)]
        return (self._encode(text) if text else []) + [self.step_token_id]


class RewardHeadFormat(PRMFormat):
    """A PRM reading the chain as it comes: ids (tokenizer None) or text; `separator` (ids, or text with a tokenizer)
    appended to each step; the score at each step's last token, from the model's reward head or, with
    token_pair=(positive_id, negative_id), from those two LM-head rows (a plain causal LM as the PRM)."""

    def __init__(self, tokenizer=None, *, separator=(), token_pair: tuple[int, int] | None = None):
        super().__init__(tokenizer)
        if token_pair is not None:
            if (isinstance(token_pair, (str, bytes)) or not hasattr(token_pair, "__len__") or len(token_pair) != 2
                    or not all(_is_int(t) and t >= 0 or self.reads_text and isinstance(t, str) for t in token_pair)):
                raise ValueError(f"token_pair must be two token ids (positive, negative) (or, with a tokenizer, "
                                 f"one-token strings), got {token_pair!r}")
            self.token_pair = tuple(self._one_token(t, "token_pair") if isinstance(t, str) else t
                                    for t in token_pair)
        if tokenizer is None:
            self.separator_ids = list(self._check("separator", separator))
        else:
            self.separator_ids = self._encode(separator) if separator else []

    def prompt_ids(self, question) -> list[int]:
        question = self._check("question", question)
        ids = self._encode(question) if self.reads_text else list(question)
        if not ids:
            raise ValueError("question must not be empty")
        return ids

    def step_ids(self, step, index: int) -> list[int]:
        self._step_index(index)
        step = self._check("step", step)
        ids = (self._encode(step) if self.reads_text else list(step)) + self.separator_ids
        if not ids:
            raise ValueError(f"step {index} is empty and the format has no separator: nothing to score")
        return ids


def chain_score(scores: list[float], how: str) -> float:
    """A chain's score from its step scores: "last", "min", "max", "prod" or "mean" (NaN without steps)."""
    if not scores:
        return math.nan
    if how == "last":
        return scores[-1]
    if how == "min":
        return min(scores)
    if how == "max":
        return max(scores)
    if how == "prod":
        return math.prod(scores)
    if how == "mean":
        return sum(scores) / len(scores)
    raise ValueError(f"aggregate must be last, min, max, prod or mean, got {how!r}")


# The formats by the names the command line uses (python -m o1kernels.decode --prm-format NAME).
FORMATS = {"reward_head": RewardHeadFormat, "qwen_math_prm": QwenMathPRM, "math_shepherd": MathShepherd,
           "skywork_prm": SkyworkPRM}
