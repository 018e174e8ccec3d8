"""Output vocabularies and chat templates: mergekit's ``tokenizer_source``, ``tokenizer`` and
``chat_template`` recipe keys.

When the models' vocabularies differ (or the recipe asks for it), the output tokenizer is built
first (the base's, a chosen model's, or the union of all of them, plus the tokens the recipe
lists), and every vocabulary-indexed tensor (input embeddings, output head, a vocabulary bias)
of every input is re-indexed to that vocabulary before the method sees it: a row for each
output token, taken from the input's own row for that token when it has one, otherwise filled
by a rule shared by all inputs. The method then merges tensors of one shape as usual.

Everything here is decided in the plan step from the tokenizers alone (`build_alignment`); the
merge only applies the result to each tensor position (`align_rows`), one position at a time.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Built-in chat templates selectable by name. Each writes the conversation in the usual layout
# of its family (ChatML, Llama 3, Alpaca, Mistral instruct, EXAONE).
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{% if system %}{{ system[-1]['content'] | trim }}{{ '\\n\\n' }}{% endif %}"
        "{% set turns = messages | rejectattr('role', 'equalto', 'system') | list %}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] | trim }}"
        "{% elif message['role'] == 'user_context' %}{{ '### Input:\\n' + message['content'] | trim }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] | trim }}"
        "{% endif %}"
        "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt and (not turns or turns[-1]['role'] != 'assistant') %}"
        "{{ ('\\n\\n' if turns else '') + '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
        "{{ bos_token }}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('after an optional system message, roles must alternate user, assistant, user, ...') }}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.first and system is not none %}{{ ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('only user and assistant roles are supported, after an optional system message') }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}
AUTO_TEMPLATE = "auto"


def resolve_chat_template(value: str) -> str:
    """The template text a recipe's ``chat_template`` stands for, or ``"auto"``.

    A short single-line value without ``{`` names a built-in template; anything else is a
    literal Jinja template and must parse.

    Raises:
        ValueError: An unknown name, or a literal that is not a Jinja template (the message says
            which and lists the names).
    """
    names = ", ".join(sorted(CHAT_TEMPLATES))
    if value == AUTO_TEMPLATE:
        return value
    if len(value) < 256 and "\n" not in value and "{" not in value:
        if value in CHAT_TEMPLATES:
            return CHAT_TEMPLATES[value]
        raise ValueError(f"unknown chat template name {value!r}; expected 'auto', one of {names}, or a Jinja template")
    if len(value) < 20 or "{" not in value:
        # As mergekit: a literal template has Jinja markup and some length.
        raise ValueError(f"got {value[:40]!r}, which is neither a template name ({names}, auto) nor a Jinja template")
    import jinja2

    try:
        jinja2.Environment().parse(value)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"the Jinja template does not parse (line {exc.lineno}: {exc.message})") from None
    return value


# -- recipe settings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSource:
    """Where a listed token's row comes from: ``model`` (its own row for the token in one of the
    merged models), ``zero``, or ``model_token`` (a given row of one model, by id or by token)."""

    kind: str  # "model" | "zero" | "model_token"
    model: Any = None  # refs.ModelRef for "model" and "model_token"
    token_id: int | None = None
    token: str | None = None


@dataclass(frozen=True)
class TokenSetting:
    """One entry of the recipe's ``tokenizer.tokens``."""

    token: str
    source: TokenSource | None
    force: bool
    key: str  # the recipe key path, for messages


@dataclass(frozen=True)
class TokenizerSettings:
    """The output vocabulary a recipe asks for.

    Attributes:
        source: ``"base"``, ``"union"`` or a ModelRef.
        tokens: Tokens added to the vocabulary and/or given a row source.
        pad_to_multiple_of: Round the number of rows up to a multiple of this.
        always: Re-index even when every model has the same vocabulary size (the ``tokenizer``
            block and ``union``); a plain ``tokenizer_source: base`` or model re-indexes only
            when the models' vocabulary sizes differ.
        key: The recipe key that set it, for messages.
    """

    source: Any
    tokens: tuple[TokenSetting, ...] = ()
    pad_to_multiple_of: int | None = None
    always: bool = True
    key: str = "tokenizer"


# -- vocabulary sizes and tensors -------------------------------------------------------------


def vocab_size_key(config: dict) -> tuple[str, ...] | None:
    """Where `config` keeps the vocabulary size: ``("vocab_size",)`` or inside ``text_config``."""
    if isinstance(config.get("vocab_size"), int):
        return ("vocab_size",)
    text = config.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("vocab_size"), int):
        return ("text_config", "vocab_size")
    return None


def vocabulary_rows(config: dict) -> int | None:
    """The number of vocabulary rows of the model `config` describes (None when it does not say)."""
    key = vocab_size_key(config)
    if key is None:
        return None
    value: Any = config
    for k in key:
        value = value[k]
    return int(value)


_NOT_VOCABULARY = ("position", "wpe", "pos_emb", "token_type")


def is_vocabulary_tensor(name: str, shape: tuple[int, ...], rows: int | None) -> bool:
    """Whether a tensor is indexed by token id along its first dimension: its first dimension is
    the model's vocabulary size (embeddings, output head, a vocabulary bias), and its name is not
    that of a position or token-type table that happens to have as many rows."""
    return rows is not None and len(shape) >= 1 and shape[0] == rows and not any(p in name for p in _NOT_VOCABULARY)


# -- tokenizers -----------------------------------------------------------------------------------


class TokenizerLoadError(Exception):
    """A tokenizer could not be loaded or reshaped (the caller adds which model and key)."""


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in `folder`, loaded by transformers (never running remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable tokenizer here"
        raise TokenizerLoadError(f"no tokenizer that transformers can load in {folder} ({type(exc).__name__}: {exc})") from None


def _reloaded(tokenizer: Any, edit: Callable[[Path], None] | None = None) -> Any:
    """A fresh copy of `tokenizer` (saved and loaded again), its files edited first by `edit`."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="hfmerge-tokenizer-") as d:
        tokenizer.save_pretrained(d)
        if edit is not None:
            edit(Path(d))
        return AutoTokenizer.from_pretrained(d, trust_remote_code=False)


def strip_tokenizer(tokenizer: Any, rows: int) -> Any:
    """`tokenizer` without the tokens whose id is `rows` or more (ids the model has no row for,
    such as unused padding tokens); `tokenizer` itself when it has none.

    Raises:
        TokenizerLoadError: Such tokens are part of a non-BPE model vocabulary (only added
            tokens and BPE vocabularies can be cut).
    """
    unused = {tok for tok, i in tokenizer.get_vocab().items() if i >= rows}
    if not unused:
        return tokenizer

    def edit(folder: Path) -> None:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerLoadError(f"{len(unused)} token(s) have ids past the model's {rows} rows and the tokenizer is not a fast one")
        data = json.loads(path.read_text())
        data["added_tokens"] = [e for e in data.get("added_tokens") or [] if e["id"] < rows]
        model = data.get("model") or {}
        vocab = model.get("vocab")
        if isinstance(vocab, dict) and unused & set(vocab):
            if model.get("type") != "BPE":
                raise TokenizerLoadError(f"its {model.get('type')} vocabulary has ids past the model's {rows} rows; only a BPE vocabulary can be cut")
            model["vocab"] = {t: i for t, i in vocab.items() if t not in unused}
            model["merges"] = [m for m in model.get("merges") or []
                               if not unused & set(m.split(" ") if isinstance(m, str) else m)]
        path.write_text(json.dumps(data))
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            if isinstance(config.get("added_tokens_decoder"), dict):
                config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items() if int(k) < rows}
                config_path.write_text(json.dumps(config))

    return _reloaded(tokenizer, edit)


def union_tokenizer(base: Any, others: Sequence[tuple[Any, int]]) -> Any:
    """The base tokenizer extended by every token of the others that has a row in its model.

    Tokens keep the base's ids; ordinary tokens the base lacks are appended in the order the
    tokenizers list them, then the added (special) tokens, each with the settings of the first
    tokenizer that has it. As mergekit builds its union vocabulary.

    Args:
        base: The (stripped) base tokenizer; it is not modified.
        others: Every input's tokenizer with its model's row count, base first.
    """
    ordinary: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tokenizer, rows in others:
        decoder = tokenizer.added_tokens_decoder
        added_contents = {info.content for info in decoder.values()}
        for tok, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            if i < rows and tok not in added_contents:
                ordinary.setdefault(tok)
        for i, info in sorted(decoder.items()):
            if i < rows and info.content not in added:
                added[info.content] = info
    out = _reloaded(base)
    known = base.get_vocab()
    for tok in ordinary:
        if tok not in known and tok not in added:
            out.add_tokens(tok)
    for info in added.values():
        out.add_tokens(info)
    return out


# -- alignment ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlignInput:
    """One input of the merge as the alignment sees it."""

    identity: str  # equal for the same model listed twice (base among the models)
    label: str
    folder: Path
    rows: int


@dataclass(frozen=True, eq=False)
class RowRules:
    """How the inputs of one tensor position (all of them, or a slice's) get their rows.

    Attributes:
        kept: Per input, output ids whose row is the input's own, and that row.
        fill_ids: Output ids whose row is shared by the inputs that do not keep their own.
        fill_parts: Per distinct input: (positions in `fill_ids`, the input's rows) that are
            summed into those shared rows; each shared row is divided by `fill_counts`
            (a row nobody contributes to stays zero).
        filled: Per input, the positions in `fill_ids` it takes.
        representative: Per distinct input, the position of the input whose tensor it reads.
        identity: Per input, True when its tensor is already in output order and size.
    """

    kept: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    fill_ids: torch.Tensor
    fill_parts: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    fill_counts: torch.Tensor
    filled: tuple[torch.Tensor, ...]
    representative: tuple[int, ...]
    identity: tuple[bool, ...]


@dataclass(frozen=True, eq=False)
class VocabularyAlignment:
    """How every input's vocabulary-indexed tensors become rows of the output vocabulary.

    Attributes:
        tokenizer: The output tokenizer (a transformers tokenizer), saved with the merge.
        tokens: Output ids in use (the largest id + 1).
        rows: Output rows: `tokens` rounded up to ``pad_to_multiple_of``; the padding rows of
            each input are the mean of its token rows.
        input_rows: Each input's row count, as its tensors must have.
        rules: For each group of inputs that feeds a vocabulary tensor together (indices into
            the inputs), how their rows are taken.
    """

    tokenizer: Any
    tokens: int
    rows: int
    input_rows: tuple[int, ...]
    rules: dict[tuple[int, ...], RowRules]


class AlignmentError(Exception):
    """A token setting cannot be honoured; `key` is the recipe key path it comes from."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _output_tokenizer(settings: TokenizerSettings, inputs: Sequence[AlignInput], tokenizers: dict[int, Any], base_tok: Any,
                      distinct: dict[str, int], input_of: Callable[[Any], int], source_folder: Path | None,
                      source_rows: int | None) -> Any:
    """The output tokenizer: the base's, the source model's or the union, plus listed tokens."""
    if settings.source == "base":
        out = _reloaded(base_tok)
    elif settings.source == "union":
        out = union_tokenizer(base_tok, [(tokenizers[i], inputs[i].rows) for i in distinct.values() if i in tokenizers])
    else:
        index = input_of(settings.source)
        if index >= 0:
            rep = distinct[inputs[index].identity]
            tok = tokenizers[rep] if rep in tokenizers else load_tokenizer(inputs[rep].folder)
            out = _reloaded(strip_tokenizer(tok, inputs[rep].rows))
        else:
            assert source_folder is not None
            tok = load_tokenizer(source_folder)
            out = _reloaded(strip_tokenizer(tok, source_rows) if source_rows else tok)
    for setting in settings.tokens:
        if setting.token not in out.get_vocab():
            out.add_tokens(setting.token)
    return out


def build_alignment(settings: TokenizerSettings, inputs: Sequence[AlignInput], *, base_index: int | None,
                    input_of: Callable[[Any], int], groups: Sequence[tuple[int, ...]] | None = None,
                    source_folder: Path | None = None, source_rows: int | None = None,
                    warn: Callable[[str], None] = logger.warning) -> VocabularyAlignment:
    """Build the output tokenizer and every input's re-indexing.

    The output tokenizer is the base's (the first model's without a base) cut to the ids its
    model has rows for, the tokenizer of `settings.source`, or the union of all inputs'; the
    tokens listed in `settings.tokens` that it lacks are added. Within a group of inputs that
    feed one tensor, each input keeps its own row for every output token it has (unless the
    token is forced); the others share one row:

    * a listed token with a source: that source (a model's row for the token, zero, or a given
      row of a model); forced tokens take it in every input;
    * otherwise, a token only one input has: that input's row; a token the base has: the base's
      row; a token no input has: zero; else the mean of the rows of the inputs that have it.

    Args:
        settings: From the recipe.
        inputs: The base (when there is one) then the models, in the plan's order.
        base_index: Index of the base in `inputs`, or None.
        input_of: The index in `inputs` of a model a token setting names (-1: none).
        groups: The groups of inputs (indices into `inputs`) whose rows are aligned together;
            default one group of all inputs.
        source_folder: The tokenizer folder of a model source that is not an input.
        source_rows: Its model's row count, when known.
        warn: Receives notes about the inputs (a tokenizer that could not be loaded, ...).

    Raises:
        TokenizerLoadError: The base or source tokenizer cannot be loaded or cut.
        AlignmentError: A token setting names a row that does not exist.
    """
    distinct: dict[str, int] = {}
    for i, inp in enumerate(inputs):
        distinct.setdefault(inp.identity, i)
    first = base_index if base_index is not None else 0
    tokenizers: dict[int, Any] = {}
    for i in distinct.values():
        try:
            tokenizers[i] = load_tokenizer(inputs[i].folder)
        except TokenizerLoadError as exc:
            if i == first:
                raise TokenizerLoadError(f"{inputs[i].label}: {exc}") from None
            # As mergekit: an input without a loadable tokenizer is taken to share the base's.
            warn(f"{inputs[i].label}: {exc}; its token ids are taken to be those of {inputs[first].label}")
    base_tok = strip_tokenizer(tokenizers[first], inputs[first].rows)
    tokenizers[first] = base_tok
    out = _output_tokenizer(settings, inputs, tokenizers, base_tok, distinct, input_of, source_folder, source_rows)
    vocab = out.get_vocab()
    tokens = max(vocab.values()) + 1 if vocab else 0
    rows = tokens
    if settings.pad_to_multiple_of and rows % settings.pad_to_multiple_of:
        rows += settings.pad_to_multiple_of - rows % settings.pad_to_multiple_of

    names: list[str | None] = [None] * tokens
    for tok, i in vocab.items():
        names[i] = tok
    # src[i][id]: row of output token `id` in input i, -1 where it has none.
    own_vocab = {i: tokenizers.get(i, base_tok).get_vocab() for i in distinct.values()}
    src: list[list[int]] = []
    for inp in inputs:
        own = own_vocab[distinct[inp.identity]]
        src.append([own.get(t, -1) if t is not None and own.get(t, -1) < inp.rows else -1 for t in names])
    state = _Tokens(settings, inputs, names, src, own_vocab, distinct, input_of, base_index, warn)
    all_inputs = tuple(range(len(inputs)))
    rules = {group: state.rules(group, tokens, rows) for group in dict.fromkeys(groups or [all_inputs])}
    return VocabularyAlignment(tokenizer=out, tokens=tokens, rows=rows, input_rows=tuple(i.rows for i in inputs), rules=rules)


@dataclass
class _Tokens:
    """What `build_alignment` knows once the output vocabulary is fixed; makes the rules of
    each group of inputs."""

    settings: TokenizerSettings
    inputs: Sequence[AlignInput]
    names: list[str | None]
    src: list[list[int]]
    own_vocab: dict[int, dict[str, int]]
    distinct: dict[str, int]
    input_of: Callable[[Any], int]
    base_index: int | None
    warn: Callable[[str], None]

    def rules(self, group: tuple[int, ...], tokens: int, rows: int) -> RowRules:
        import torch

        inputs, src, names = self.inputs, self.src, self.names
        # Distinct inputs of the group, by position in the group (the same model listed twice
        # counts once in the shared rows, as in mergekit).
        reps: dict[str, int] = {}
        for pos, i in enumerate(group):
            reps.setdefault(inputs[i].identity, pos)
        rep_positions = list(reps.values())
        by_token = {s.token: s for s in self.settings.tokens}
        vocab = {n: i for i, n in enumerate(names) if n is not None}
        forced = {vocab[s.token] for s in self.settings.tokens if s.force}

        def position_of(model: Any, key: str) -> int:
            index = self.input_of(model)
            if index < 0:
                raise AlignmentError(key, f"{getattr(model, 'text', model)!r} is not one of the merged models")
            pos = reps.get(inputs[index].identity)
            if pos is None:
                raise AlignmentError(key, f"{inputs[index].label} does not feed the vocabulary tensors of this merge (a slice's sources)")
            return pos

        base_pos = reps.get(inputs[self.base_index].identity) if self.base_index is not None and self.base_index in group else None
        fill_ids: list[int] = []
        parts: dict[int, tuple[list[int], list[int]]] = {p: ([], []) for p in rep_positions}
        counts: list[int] = []
        for tid in range(tokens):
            has = [p for p in rep_positions if src[group[p]][tid] >= 0]
            if tid not in forced and len(has) == len(rep_positions):
                continue  # every input keeps its own row
            setting = by_token.get(names[tid]) if names[tid] is not None else None  # type: ignore[arg-type]
            contrib = self._contributions(setting, tid, has, base_pos, group, position_of)
            pos = len(fill_ids)
            fill_ids.append(tid)
            counts.append(len(contrib))
            for p, row in contrib:
                parts[p][0].append(pos)
                parts[p][1].append(row)

        fill_index = {tid: pos for pos, tid in enumerate(fill_ids)}
        kept, filled, identity = [], [], []
        for i in group:
            s = src[i]
            keep_ids = [tid for tid in range(tokens) if s[tid] >= 0 and tid not in forced]
            kept.append((_long(keep_ids), _long([s[t] for t in keep_ids])))
            keep_set = set(keep_ids)
            filled.append(_long([fill_index[t] for t in fill_ids if t not in keep_set]))
            identity.append(rows == tokens == inputs[i].rows and keep_ids == list(range(tokens)) and s == list(range(tokens)))
        return RowRules(kept=tuple(kept), fill_ids=_long(fill_ids), fill_parts=tuple((_long(parts[p][0]), _long(parts[p][1])) for p in rep_positions),
                        fill_counts=torch.tensor(counts, dtype=torch.float32), filled=tuple(filled),
                        representative=tuple(rep_positions), identity=tuple(identity))

    def _contributions(self, setting: TokenSetting | None, tid: int, has: list[int], base_pos: int | None,
                       group: tuple[int, ...], position_of: Callable[[Any, str], int]) -> list[tuple[int, int]]:
        """(group position, row) pairs averaged into the shared row of output token `tid`."""
        inputs, src = self.inputs, self.src
        if setting is not None and setting.source is not None:
            source = setting.source
            if source.kind == "zero":
                return []
            if source.kind == "model":
                p = position_of(source.model, f"{setting.key}.source")
                if src[group[p]][tid] < 0:
                    raise AlignmentError(f"{setting.key}.source", f"{inputs[group[p]].label} has no token {setting.token!r} (with a row in its model)")
                return [(p, src[group[p]][tid])]
            p = position_of(source.model, f"{setting.key}.source.model")
            inp = inputs[group[p]]
            if source.token_id is not None:
                row, what, key = source.token_id, f"token_id {source.token_id}", f"{setting.key}.source.token_id"
            else:
                row = self.own_vocab[self.distinct[inp.identity]].get(source.token, -1)  # type: ignore[arg-type]
                what, key = f"token {source.token!r}", f"{setting.key}.source.token"
            if not 0 <= row < inp.rows:
                raise AlignmentError(key, f"{inp.label} has no row for {what} (it has {inp.rows} rows)")
            return [(p, row)]
        if len(has) == 1:
            return [(has[0], src[group[has[0]]][tid])]
        if not has:
            name = self.names[tid]
            if name is not None and setting is None:
                self.warn(f"token {name!r} of the output vocabulary is in no merged model; its rows are zero")
            return []
        if base_pos is not None and src[group[base_pos]][tid] >= 0:
            return [(base_pos, src[group[base_pos]][tid])]
        return [(p, src[group[p]][tid]) for p in has]


def _long(values: list[int]) -> torch.Tensor:
    import torch

    return torch.tensor(values, dtype=torch.long)


def align_rows(tensors: Sequence[torch.Tensor], alignment: VocabularyAlignment, group: tuple[int, ...] | None = None) -> list[torch.Tensor]:
    """The vocabulary-indexed tensors of one position re-indexed to the output vocabulary.

    Args:
        tensors: One tensor per input of `group` (in its order), token id along the first
            dimension, each with its model's row count and equal other dimensions.
        alignment: From `build_alignment`.
        group: The inputs the tensors come from (indices into the alignment's inputs); default
            all of them.

    Returns:
        One tensor per input with `alignment.rows` rows, in the dtype of the inputs.
    """
    import torch

    rules = alignment.rules[group if group is not None else tuple(range(len(alignment.input_rows)))]
    rest = tensors[0].shape[1:]
    dtype = tensors[0].dtype
    shared = torch.zeros((len(rules.fill_ids), *rest), dtype=dtype)
    for (positions, rows), p in zip(rules.fill_parts, rules.representative):
        if len(positions):
            shared.index_add_(0, positions, tensors[p][rows].to(dtype))
    shared /= rules.fill_counts.clamp(min=1).to(dtype).view(-1, *([1] * len(rest)))
    out = []
    for x, (ids, rows), taken, same in zip(tensors, rules.kept, rules.filled, rules.identity):
        if same:
            out.append(x)
            continue
        y = torch.zeros((alignment.rows, *rest), dtype=dtype)
        y[ids] = x[rows].to(dtype)
        if len(taken):
            y[rules.fill_ids[taken]] = shared[taken]
        if alignment.rows > alignment.tokens:
            # Padding rows: the mean of the token rows (a neutral start for rows never trained).
            y[alignment.tokens:] = y[:alignment.tokens].mean(dim=0)
        out.append(y)
    return out


def auto_chat_template(folders: Sequence[Path]) -> str | None:
    """The chat template most of the given tokenizer folders carry (the first one seen among
    equally common ones), or None when none carries one."""
    found = []
    for folder in folders:
        try:
            template = load_tokenizer(folder).chat_template
        except TokenizerLoadError:
            continue
        if isinstance(template, dict):
            template = template.get("default")
        if isinstance(template, str) and template.strip():
            found.append(template.strip())
    return Counter(found).most_common(1)[0][0] if found else None
