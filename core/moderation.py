"""The content filter: a moderation policy of categories, each with terms and regular expressions.

The deployment's default policy is a TOML file (`GEMMAQ_MODERATION_POLICY`, else
core/moderation.toml); a user's quota row may carry an override, a whole policy of the same
shape (`gemmaq users set-quota --moderation-policy FILE`, or the admin API). Inputs are checked
at submission (400 `CONTENT_FILTERED`), outputs by the worker before they are stored (the job
fails `RESPONSE_FILTERED` and its text is withheld), streamed text before it is published, and
`POST /v1/moderations` answers from the same policy.

Matching: the text is NFKC-normalised and case-folded; a term matches as a whole word (or whole
phrase), a pattern anywhere. Patterns are RE2 expressions (google-re2): RE2 runs in time linear
in the text, so no input, however crafted, makes a check slow. Only a category's name ever
leaves this module — never the text that matched.
"""

from __future__ import annotations

import functools
import json
import tomllib
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import re2
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from core.settings import Settings

DEFAULT_POLICY = Path(__file__).with_name("moderation.toml")
Stage = Literal["input", "output"]
STAGES: tuple[Stage, ...] = ("input", "output")
# A stream's text is held back this far behind what was generated, so that a pattern forming at
# the end is checked whole before any of it is shown (a term: its own length is held). A pattern
# that matches a longer span is still caught by the check of the whole output.
PATTERN_HOLD_CHARS = 64
# OpenAI's moderation categories: a moderation result names each (false unless a policy
# category of that name matched), so that clients reading any of them find it.
OPENAI_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
    "violence/graphic",
)  # fmt: skip

# Whole words, Unicode-aware (RE2's own \b knows ASCII words only).
_EDGE_BEFORE, _EDGE_AFTER = r"(?:^|[^\p{L}\p{N}_])", r"(?:[^\p{L}\p{N}_]|$)"


def _options() -> Any:
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False  # a bad pattern is reported to whoever wrote it, not to stderr
    return options


Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9/_-]{0,63}$")]
Term = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Pattern = Annotated[str, StringConstraints(min_length=1, max_length=1000)]


class CategorySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    terms: list[Term] = Field(default_factory=list, max_length=2000)  # words or phrases
    patterns: list[Pattern] = Field(default_factory=list, max_length=200)
    stages: list[Stage] = Field(default_factory=lambda: list(STAGES), min_length=1)


class PolicySpec(BaseModel):
    """A policy as written (TOML file, quota override): `[categories.<name>]` tables."""

    model_config = ConfigDict(extra="forbid")
    categories: dict[Name, CategorySpec] = Field(default_factory=dict, max_length=64)
    stream_hold_chars: int = Field(
        PATTERN_HOLD_CHARS, ge=0, le=4096, description="a stream's text held back for patterns to match whole"
    )

    @model_validator(mode="after")
    def _compiles(self) -> PolicySpec:
        for name, category in self.categories.items():
            for pattern in category.patterns:
                try:
                    re2.compile(pattern, _options())
                except re2.error as exc:
                    problem = f"pattern {pattern[:60]!r} is not RE2 syntax ({exc})"
                    raise ValueError(f"categories.{name}: {problem}") from exc
        return self


class PolicyError(ValueError):
    """A policy that cannot be used: malformed TOML, an unknown field, a bad pattern."""


def normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def _phrase(term: str) -> str:
    """A term's words, any run of spaces between them."""
    return r"\s+".join(re2.escape(word) for word in normalise(term).split())


@dataclass(frozen=True)
class _Category:
    name: str
    stages: frozenset[str]
    matcher: Any  # a compiled RE2 expression
    hold: int  # characters of a stream to hold back for this category


class Policy:
    def __init__(self, spec: PolicySpec) -> None:
        self.spec = spec
        self.categories: list[_Category] = []
        for name, category in spec.categories.items():
            parts = [_EDGE_BEFORE + _phrase(t) + _EDGE_AFTER for t in category.terms]
            parts += [f"(?:{p})" for p in category.patterns]
            if not parts:
                continue
            # Normalising may join characters (a letter and its accent): hold twice the term.
            hold = max((2 * len(normalise(t)) + 1 for t in category.terms), default=0)
            if category.patterns:
                hold = max(hold, spec.stream_hold_chars)
            matcher = re2.compile("|".join(parts), _options())
            self.categories.append(_Category(name, frozenset(category.stages), matcher, hold))

    def check(self, text: str, stage: Stage) -> str | None:
        """The first category of this stage the text falls in, or None."""
        folded = normalise(text)
        for category in self.categories:
            if stage in category.stages and category.matcher.search(folded):
                return category.name
        return None

    def flags(self, text: str) -> dict[str, bool]:
        """Every category, of either stage: whether the text falls in it."""
        folded = normalise(text)
        return {c.name: bool(c.matcher.search(folded)) for c in self.categories}

    def hold(self, stage: Stage = "output") -> int:
        """How far behind a stream's published text must stay (0: nothing to check)."""
        return max((c.hold for c in self.categories if stage in c.stages), default=0)


def parse(spec: Any) -> PolicySpec:
    """A policy from its JSON/TOML object, or PolicyError saying what is wrong with it."""
    try:
        return PolicySpec.model_validate(spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PolicyError(f"{where}: {first['msg']}" if where else first["msg"]) from None


def read_file(path: Path) -> PolicySpec:
    try:
        return parse(tomllib.loads(path.read_text()))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"{path}: {exc}") from None


@functools.lru_cache(maxsize=8)
def _default(path: str, mtime: float) -> Policy:
    return Policy(read_file(Path(path)))


def default_policy(path: Path | None) -> Policy:
    """The deployment's policy (read again when its file changes)."""
    path = path or DEFAULT_POLICY
    try:
        mtime = path.stat().st_mtime
    except OSError as exc:
        raise PolicyError(f"{path}: {exc}") from None
    return _default(str(path), mtime)


@functools.lru_cache(maxsize=256)
def _override(serialised: str) -> Policy:
    return Policy(parse(json.loads(serialised)))


def user_override(user: Any) -> dict[str, Any] | None:
    """The moderation override on a user's quota row (a `db.models.User`), if any."""
    quota = getattr(user, "quota", None)
    return quota.moderation_policy if quota is not None else None


def policy_for(override: dict[str, Any] | None, settings: Settings) -> Policy:
    """A user's policy: their quota's override (`quotas.moderation_policy`), else the
    deployment's (`GEMMAQ_MODERATION_POLICY`, read again when its file changes). The one lookup
    the API (inputs, /v1/moderations) and the worker shell (outputs) both make."""
    if override is None:
        return default_policy(settings.moderation_policy)
    return _override(json.dumps(override, sort_keys=True))


class StreamFilter:
    """A streamed output's text, published only once checked: what may be shown now is all but the
    last `hold` characters; once the text falls in a category, nothing more is shown."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.hold = policy.hold("output")
        self.text = ""
        self.shown = 0  # characters published
        self.tripped: str | None = None  # the category, once one matched

    def feed(self, delta: str) -> str:
        """Text that may be published now, after this delta."""
        self.text += delta
        if self.tripped is not None:
            return ""
        if self.hold == 0:
            return self._show(len(self.text))
        self.tripped = self.policy.check(self.text, "output")
        if self.tripped is not None:
            return ""
        return self._show(max(self.shown, len(self.text) - self.hold))

    def rest(self) -> str:
        """What is still held, once the whole output has passed its check."""
        return "" if self.tripped is not None else self._show(len(self.text))

    def _show(self, upto: int) -> str:
        shown, self.shown = self.text[self.shown : upto], max(self.shown, upto)
        return shown
