"""CLIP's tokenizer: text -> the 77 token ids that Stable Diffusion's text encoder reads.

This is the tokenizer of the original CLIP (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision", openai/CLIP `clip/simple_tokenizer.py`), step for step:

1. clean: repair broken unicode with ftfy, unescape HTML entities, collapse whitespace, lower-case;
2. pre-split with a regex into words, single digits and runs of punctuation;
3. spell each piece's UTF-8 bytes as printable characters (GPT-2's byte-level BPE, Radford et al. 2019,
   "Language Models are Unsupervised Multitask Learners"), so no text is ever out of vocabulary;
4. apply the BPE merges; the last symbol of each piece carries "</w>" (CLIP's addition), so "cat" at the end
   of a word and "cat" inside "cats" are different tokens;
5. wrap in <|startoftext|> (49406) ... <|endoftext|> (49407); on request truncate and pad to 77 positions.

The call, decode and the vocabulary methods take transformers' CLIPTokenizer arguments with its defaults (no
padding, no truncation, python lists), so course code runs unchanged; SD's pipelines ask for padding="max_length",
truncation=True, return_tensors="pt".

transformers 5's CLIPTokenizer runs no ftfy and no html.unescape (it applies NFC instead), so curly quotes,
ligatures, fullwidth letters, "&amp;" and mojibake get other ids there than here; on other text the ids are
the same. And with SD 2.x's pad token "!", transformers cuts every "!" out of a prompt as the pad id 0;
here, as in open_clip (which SD 2.x was trained with), the pad token only fills the row after EOS.
tests/test_tokenizer.py checks these statements.
"""

import gzip
import html
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import ftfy
import regex as re
import torch

CLIP_VOCAB_GZ = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# CLIP's pre-split. The two special tokens come first, so they stay whole; then English contractions, letter
# runs, single digits (every number is split into digits), and runs of everything else but whitespace.
PRE_SPLIT = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", re.IGNORECASE
)


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """The 256 byte values -> 256 printable characters (GPT-2's table).

    Printable Latin-1 bytes stand for themselves; the other 68 (space, controls, ...) are moved to chr(256 + n),
    so the BPE never sees whitespace or control characters and any byte string can be spelled."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    """Adjacent symbol pairs of a word: ("c", "a", "t</w>") -> {("c", "a"), ("a", "t</w>")}."""
    return set(zip(word, word[1:], strict=False))


def clean(text: str) -> str:
    """CLIP's text cleaning (basic_clean + whitespace_clean + lower). str -> str."""
    text = ftfy.fix_text(text)  # mojibake "cafÃ©" -> "café", "ﬁ" -> "fi", curly quotes -> straight, fullwidth -> ASCII
    text = html.unescape(html.unescape(text))  # twice, as CLIP does: "&amp;amp;" -> "&amp;" -> "&"
    return re.sub(r"\s+", " ", text).strip().lower()


def load_clip_bpe(path: str | Path = CLIP_VOCAB_GZ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Read CLIP's merges file and build its vocabulary the way CLIP does.

    Returns (vocab, merges): merges in rank order, and vocab mapping 49,408 token strings to ids: the 256 byte
    characters (0..255), the same with "</w>" (256..511), one token per merge (512..49405), then BOS and EOS."""
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # skip the header; CLIP keeps 48,894
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(merge) for merge in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


# transformers' padding and truncation strategies, as they act on one sequence per row
PADDING = {False: None, "do_not_pad": None, True: "longest", "longest": "longest", "max_length": "max_length"}
TRUNCATION = {False: False, "do_not_truncate": False, True: True, "longest_first": True, "only_first": True}


class TokenizerOutput(dict):
    """What CLIPTokenizer returns: {"input_ids": ..., "attention_mask": ...}, whose keys also read as attributes
    (`out.input_ids`), like transformers' BatchEncoding, so diffusers-style code runs unchanged."""

    def __getattr__(self, key: str) -> torch.Tensor | list:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer.

    vocab, merges: token -> id and the merges in rank order, as in a model's tokenizer/vocab.json + merges.txt;
        both None (the default) loads CLIP's own file shipped in minidiff/models/assets.
    pad_token: what fills the positions after EOS. "<|endoftext|>" (49407) for SD 1.x, "!" (0) for SD 2.x and
        open_clip, whose text encoders were trained with zeros there.
    model_max_length: CLIP's context, 77 positions.
    """

    def __init__(self, vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None,
                 pad_token: str = EOS, model_max_length: int = 77):
        if (vocab is None) != (merges is None):
            raise ValueError("pass both vocab and merges, or neither for CLIP's own")
        if vocab is None:
            vocab, merges = load_clip_bpe()
        self.encoder = dict(vocab)
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {tuple(merge): rank for rank, merge in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache = {BOS: (BOS,), EOS: (EOS,)}  # as in CLIP: the special tokens skip the merges
        self.added_tokens: dict[str, int] = {}  # cleaned token -> id, for textual inversion
        self.added_split: re.Pattern | None = None
        self.pad_token = pad_token
        self.model_max_length = model_max_length
        self.bos_token_id = self.encoder[BOS]
        self.eos_token_id = self.encoder[EOS]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, subfolder: str | None = None,
                        revision: str | None = None) -> "CLIPTokenizer":
        """transformers' loader: a tokenizer folder, a model folder holding one (a minidiff folder, a diffusers
        pipeline with subfolder="tokenizer", a transformers CLIP folder) or a hub id already in the local Hugging
        Face cache; never downloads. Formats are read in minidiff/convert/pretrained.py (the one call up)."""
        from minidiff.convert.pretrained import load_tokenizer

        return load_tokenizer(pretrained_model_name_or_path, subfolder=subfolder, revision=revision)

    @classmethod
    def from_folder(cls, path: str | Path) -> "CLIPTokenizer":
        """Load a model's tokenizer folder in the transformers/diffusers layout (see read_tokenizer_folder), with
        its pad token, length (77 if it names none) and added tokens."""
        files = read_tokenizer_folder(path)
        tokenizer = cls(files.vocab, files.merges, pad_token=files.pad_token,
                        model_max_length=files.model_max_length or 77)
        if tokenizer.add_tokens(files.added_tokens) != len(files.added_tokens):
            raise ValueError(f"{path}: an added token is already in the vocabulary once cleaned: {files.added_tokens}")
        return tokenizer

    @property
    def vocab_size(self) -> int:
        """The base vocabulary (49,408 for CLIP), without added tokens, as in transformers; len() includes them."""
        return len(self.encoder)

    def __len__(self) -> int:
        return len(self.encoder) + len(self.added_tokens)

    @property
    def pad_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.pad_token)

    def get_vocab(self) -> dict[str, int]:
        """Token -> id for the vocabulary and the added tokens, as in transformers."""
        return self.encoder | self.added_tokens

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        """Vocabulary lookup of token strings ("!" -> 0, "cat</w>" -> 2368, an added "<cat-toy>" -> 49408).
        Raises KeyError for a string that is not a token (transformers returns the unknown id, 49407, instead)."""
        if isinstance(tokens, list):
            return [self.convert_tokens_to_ids(token) for token in tokens]
        return self.encoder[tokens] if tokens in self.encoder else self.added_tokens[clean(tokens)]

    def add_tokens(self, new_tokens: str | list[str]) -> int:
        """Add whole-word tokens, e.g. a textual-inversion placeholder "<cat-toy>" (one string or a list), with new
        ids 49408, 49409, ...

        They are matched in the cleaned text before the pre-split and BPE, so never broken up; since the text
        is lower-cased first, case does not matter ("<Cat-Toy>" == "<CAT-TOY>"), and like transformers' added
        tokens they match anywhere, even glued to other text ("a<cat-toy>." -> a, <cat-toy>, .). Spaces
        around them are ignored, as everywhere in CLIP. A token whose cleaned form is already in the vocabulary
        or already added is skipped. Returns the number of new ids."""
        added = 0
        for token in [new_tokens] if isinstance(new_tokens, str) else new_tokens:
            key = clean(token)
            if not key:
                raise ValueError(f"cannot add {token!r}: it is empty after cleaning")
            if key in self.encoder or key in self.added_tokens:
                continue
            new_id = self.added_tokens[key] = len(self)
            # spelled in byte characters without "</w>": as in transformers, no space follows it in decode
            self.decoder[new_id] = "".join(self.byte_encoder[b] for b in key.encode("utf-8"))
            added += 1
        # one alternation, longest first, so "<cat-toy>-2" wins over "<cat-toy>"; the group keeps the matches
        keys = sorted(self.added_tokens, key=len, reverse=True)
        self.added_split = re.compile("(" + "|".join(map(re.escape, keys)) + ")") if keys else None
        return added

    def bpe(self, token: str) -> tuple[str, ...]:
        """One pre-split piece (in byte characters) -> its BPE tokens. Starting from single characters, merge
        the adjacent pair with the best (lowest) rank everywhere in the word, until no pair has a rank."""
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        pairs = get_pairs(word)
        while pairs:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):  # left to right, so "aaa" with the pair (a, a) gives (aa, a)
                if word[i : i + 2] == bigram:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            pairs = get_pairs(word)
        self.cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        """Text -> token ids, without BOS/EOS and without truncation."""
        text = clean(text)
        # re.split with a group: the added tokens land at the odd positions, the text between at the even ones
        pieces = self.added_split.split(text) if self.added_split else [text]
        ids = []
        for k, piece in enumerate(pieces):
            if k % 2:
                ids.append(self.added_tokens[piece])
                continue
            for word in PRE_SPLIT.findall(piece):
                word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                ids.extend(self.encoder[token] for token in self.bpe(word))
        return ids

    def tokenize(self, text: str) -> list[str]:
        """Text -> token strings: "a cats" -> ["a</w>", "cats</w>"], an added token as itself; no BOS/EOS."""
        return [self.decoder[i] for i in self.encode(text)]

    def decode(self, token_ids: int | list[int] | torch.Tensor, skip_special_tokens: bool = False) -> str | list[str]:
        """Token ids -> text, as transformers decodes CLIP's: every word-final "</w>" becomes a space and the ends
        are stripped, so [320, 1125, 269] -> "a photo ." and 320 -> "a". BOS, EOS and pads come out as their text
        ("<|startoftext|>a cat <|endoftext|>") unless skip_special_tokens. A batch (list of lists or a 2-D tensor)
        gives one string per row."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if token_ids and isinstance(token_ids[0], list):
            return [self.decode(ids, skip_special_tokens) for ids in token_ids]
        skip = {self.bos_token_id, self.eos_token_id, self.pad_token_id} if skip_special_tokens else set()
        text = "".join(self.decoder[int(i)] for i in token_ids if int(i) not in skip)
        text = bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()

    def __call__(self, text: str | list[str], *, padding: bool | str = False, truncation: bool | str | None = None,
                 max_length: int | None = None, return_tensors: str | None = None,
                 return_attention_mask: bool | None = None) -> TokenizerOutput:
        """Prompts -> BOS + ids + EOS per prompt, with transformers' arguments and defaults.

        text: one prompt (flat lists; a batch of one with "pt") or a list of prompts (one row each).
        padding: False or "do_not_pad" (the default) leaves every row as long as its prompt; True or "longest"
            pads to the longest row; "max_length" to max_length. Pads are pad_token_id.
        truncation: True, "longest_first" or "only_first" cuts rows to BOS + (max_length - 2) tokens + EOS, so
            EOS, whose hidden state is CLIP's pooled output, stays. None (the default) truncates only when
            max_length is given and padding is False, as transformers does; False or "do_not_truncate" never.
        max_length: defaults to model_max_length (77) where truncation or padding="max_length" needs one.
        return_tensors: None (the default) gives python lists; "pt" int64 tensors (B, L), so rows of one length.
        return_attention_mask: None or True adds attention_mask, 1 for BOS..EOS, 0 for pads; False leaves it out.
        """
        if padding not in PADDING:
            raise ValueError(f"padding must be one of {list(PADDING)}, not {padding!r}")
        if truncation is None:
            truncation = max_length is not None and padding is False
        elif truncation in TRUNCATION:
            truncation = TRUNCATION[truncation]
        else:
            raise ValueError(f"truncation must be None or one of {list(TRUNCATION)}, not {truncation!r}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"only PyTorch tensors are returned, not {return_tensors!r}")
        max_length = self.model_max_length if max_length is None else max_length
        if truncation and max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for BOS and EOS")

        rows = []
        for prompt in [text] if isinstance(text, str) else text:
            ids = self.encode(prompt)
            rows.append([self.bos_token_id, *(ids[: max_length - 2] if truncation else ids), self.eos_token_id])
        # rows already longer than `length` stay as they are, so length 0 pads nothing
        length = {"longest": max(map(len, rows), default=0), "max_length": max_length, None: 0}[PADDING[padding]]
        out = TokenizerOutput(input_ids=[ids + [self.pad_token_id] * (length - len(ids)) for ids in rows])
        if return_attention_mask is not False:
            out["attention_mask"] = [[1] * len(ids) + [0] * (length - len(ids)) for ids in rows]
        if return_tensors == "pt":
            if len(lengths := sorted({len(ids) for ids in out["input_ids"]})) > 1:
                raise ValueError(f"rows of {lengths} tokens make no tensor: pass padding=True or "
                                 "padding='max_length' (with truncation=True)")
            return TokenizerOutput({key: torch.tensor(value, dtype=torch.long) for key, value in out.items()})
        if isinstance(text, str):
            return TokenizerOutput({key: value[0] for key, value in out.items()})
        return out


@dataclass
class TokenizerFiles:
    """What a hub tokenizer folder says."""

    vocab: dict[str, int]  # token -> id, 49,408 entries for CLIP
    merges: list[tuple[str, str]]  # in rank order
    pad_token: str = EOS
    model_max_length: int | None = None  # None: the folder does not say
    added_tokens: list[str] = field(default_factory=list)  # ids len(vocab), len(vocab) + 1, ... (textual inversion)


def read_tokenizer_folder(path: str | Path) -> TokenizerFiles:
    """Read a tokenizer folder as transformers writes it: vocab.json + merges.txt (a "#version" header, then one
    merge per line; hub repos), or tokenizer.json alone (transformers 5's save_pretrained). The pad token and
    length come from tokenizer_config.json, where special_tokens_map.json wins as in transformers (SD 2.x: its
    config says "<|endoftext|>", its special_tokens_map says "!", and "!" is what the model was used with).
    Added tokens are the entries with ids past the vocabulary, from tokenizer.json, added_tokens.json or
    tokenizer_config.json's added_tokens_decoder; they must follow the vocabulary without gaps."""
    path = Path(path)

    def read(name: str) -> dict:
        return json.loads((path / name).read_text(encoding="utf-8")) if (path / name).is_file() else {}

    fast, config = read("tokenizer.json"), {**read("tokenizer_config.json"), **read("special_tokens_map.json")}
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        vocab = read("vocab.json")
        lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    elif fast.get("model", {}).get("type") == "BPE":
        vocab = fast["model"]["vocab"]
        merges = [tuple(m.split() if isinstance(m, str) else m) for m in fast["model"]["merges"]]
    else:
        raise FileNotFoundError(f"{path}: no vocab.json + merges.txt, and no BPE tokenizer.json")
    added = {entry["content"]: entry["id"] for entry in fast.get("added_tokens", [])}
    added |= read("added_tokens.json")
    added |= {entry["content"]: int(i) for i, entry in config.get("added_tokens_decoder", {}).items()}
    added = sorted((i, token) for token, i in added.items() if i >= len(vocab))
    if [i for i, _ in added] != list(range(len(vocab), len(vocab) + len(added))):
        raise ValueError(f"{path}: added token ids {[i for i, _ in added]} do not follow the vocabulary "
                         f"({len(vocab)} tokens) without gaps")
    pad = config.get("pad_token", EOS)
    return TokenizerFiles(vocab, merges, pad["content"] if isinstance(pad, dict) else pad,  # str or AddedToken
                          config.get("model_max_length"), [token for _, token in added])
