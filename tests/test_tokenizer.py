"""Parity of minidiff's CLIP tokenizer with two real third-party implementations, on a corpus built below.

- open_clip_torch 3.3.0, `open_clip/tokenizer.py`: openai/CLIP's simple_tokenizer (ftfy, html.unescape twice,
  whitespace clean, lower-case) plus `tokenize(texts, context_length=77)`. `import open_clip` imports
  torchvision, which PyPI would bring with another torch, so the package is installed without dependencies,
  `pip install --no-deps open_clip_torch==3.3.0`, and only that one file is loaded, from its path: it imports
  gzip, html, ftfy, regex, numpy and torch, nothing of its own package, so open_clip/__init__.py never runs.
- transformers 5.23 CLIPTokenizer, built from a model tokenizer folder written here: vocab.json and merges.txt
  made from CLIP's merges file in the hub's format, next to SD 1.5's or SD 2.1's tokenizer configs from
  shared/reference_configs. It has no ftfy, so it is compared on plain ASCII, and the rest is recorded.
"""

import importlib.util
import json
import random
import shutil
import string
from pathlib import Path

import pytest
import torch

from minidiff.models.tokenizer import CLIPTokenizer, clean, load_clip_bpe

REFERENCE_CONFIGS = Path(__file__).resolve().parent / "reference_configs"  # copies of the real hub configs
SD_TOKENIZERS = {"sd1": "runwayml__stable-diffusion-v1-5", "sd2": "stabilityai__stable-diffusion-2-1"}
BOS, EOS = 49406, 49407
SD_CALL = {"padding": "max_length", "truncation": True, "return_tensors": "pt"}  # what SD's pipelines pass

# ---------------------------------------------------------------------------------------------------- corpus

SUBJECTS = ["a cat", "an astronaut", "a red fox", "the Eiffel Tower", "two dogs", "a bowl of ramen", "an old man",
            "a medieval castle", "a robot", "a lighthouse", "a corgi", "a vase of sunflowers", "a steampunk airship",
            "a dragon", "a girl with a pearl earring", "New York City", "a cyberpunk street", "a teddy bear"]
SCENES = ["riding a horse", "sitting on a bench", "in the rain", "on the moon", "under water", "at sunset",
          "in a forest", "reading a book", "on Mars", "in a snow globe", "at night", "made of lego"]
STYLES = ["oil painting", "digital art", "photorealistic", "by greg rutkowski", "trending on artstation", "4k",
          "8k uhd", "unreal engine", "studio ghibli style", "watercolor", "pixel art", "35mm film",
          "highly detailed", "octane render", "(masterpiece:1.2)", "[bokeh]", "cinematic lighting", "f/1.8",
          "85mm", "HDR", "low-poly", "isometric", "dslr", "by Alphonse Mucha", "sharp focus", "vibrant colours"]
ASCII_EDGES = ["", " ", "   ", "\t", "\n", " \t\n \r\n ", "a\tb\nc", "  leading", "trailing  ", "UPPER CASE",
               "MiXeD cAsE", "don't", "you'll we've I'M they'd she's O'Neil", "'s 't 're", "'quoted'",
               "\"double quoted\"", "1234567890", "3.14159", "2024-01-01", "1e-5", "100%", "$9.99", "!!!", "...",
               "?!?!", "((masterpiece))", "[best quality:1.2]", "{a|b}", "a,b,c", "--ar 16:9 --v 5", "#hashtag",
               "@user", "http://example.com/path?q=1", "C++ and C#", "a_b-c/d\\e", "~`^*+=<>|", "x" * 300,
               "9" * 200, "supercalifragilisticexpialidocious", "a" * 77, "lorem ipsum " * 40]
UNICODE_EDGES = [
    "café", "naïve", "Ångström", "Zürich", "São Paulo", "crème brûlée", "Đà Nẵng", "e\u0301te\u0301",  # accents
    "\u201chello\u201d", "it\u2019s", "don\u2019t", "\u2018single\u2019", "\u00abguillemets\u00bb", "\u201equote\u201c",
    "🐱 cat", "👩‍🚀 astronaut", "🇯🇵", "❤️", "🔥🔥🔥", "a🎨b", "👍🏽",  # emoji, ZWJ, flags, skin tones
    "東京の夜景", "한국어 프롬프트", "中文 prompt", "ｶﾀｶﾅ", "Москва", "Ελλάδα", "مرحبا", "שלום", "नमस्ते", "ภาษาไทย",
    "&amp;", "&lt;b&gt;bold&lt;/b&gt;", "&quot;hi&quot;", "&#39;", "&amp;amp;", "&#x1F600;", "&nbsp;x",
    "Tom &amp; Jerry", "&copy 2024", "&#28;", "AT&T", "a & b", "&unknown;",  # html entities
    "cafÃ©", "â€œquotedâ€\x9d", "Ã¼ber", "naÃ¯ve", "SchÃ¶n", "â€™s",  # mojibake
    "ﬁne", "ﬂower", "oﬀice", "ﬃ", "Æsop", "Œuvre",  # ligatures
    "ＡＢＣ", "１２３", "ｈｅｌｌｏ　ｗｏｒｌｄ", "！？",  # fullwidth
    "a\u00a0b", "a\u2003b", "a\u3000b", "a\u2028b", "a\u200bb", "a\u00adb", "\ufeffbom", "a\u200fb", "a\x85b",
    "a\x00b", "a\x07b", "a\x1cb", "a\x7fb", "a\x9db", "\u2060",  # spaces, zero-widths, controls
    "½ ¾ ² ³ ⅷ", "①②③", "٣٤٥", "𝕬𝖇𝖈", "𝟙𝟚𝟛", "™ © ®", "€ £ ¥", "→ ← ↑", "∑ ∫ √", "°C", "µm", "ß", "İstanbul", "ǅ",
]


def build_corpus() -> list[str]:
    """About 4,000 prompts: combinatorial ASCII prompts, the edge cases above, random mixes of them, and random
    strings from many unicode blocks."""
    rng = random.Random(0)
    corpus = list(ASCII_EDGES) + list(UNICODE_EDGES)
    for subject in SUBJECTS:
        for scene in SCENES:
            styles = rng.sample(STYLES, rng.randint(0, 6))
            prompt = rng.choice([", ", " ", "; ", ","]).join([f"{subject} {scene}", *styles])
            corpus.append(rng.choice([str, str, str.title, str.upper, str.capitalize])(prompt))
    words = " ".join(SUBJECTS + SCENES + STYLES).split()
    for _ in range(1500):
        corpus.append(" ".join(rng.choices(words, k=rng.randint(1, 30))))
    pieces = words + ASCII_EDGES + UNICODE_EDGES
    for _ in range(1200):
        corpus.append(rng.choice(["", " ", "\t", "\n", ",", "  "]).join(rng.choices(pieces, k=rng.randint(1, 8))))
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
              (0xE00, 0xE7F), (0x2000, 0x22FF), (0x3000, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
              (0xFB00, 0xFB4F), (0xFF00, 0xFFEF), (0x1D400, 0x1D7FF), (0x1F300, 0x1FAFF)]
    for _ in range(800):
        lo, hi = rng.choice(blocks)
        corpus.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12))))
    for n in (60, 74, 75, 76, 77, 100, 500):  # prompts around and over the 75-token budget
        corpus.append(" ".join(rng.choices(words, k=n)))
    return corpus


CORPUS = build_corpus()


def is_plain_ascii(text: str) -> bool:
    """Text that ftfy and html.unescape leave alone, so transformers (which runs neither) must agree on it."""
    return all(c in string.printable for c in text) and "&" not in text


PLAIN = [text for text in CORPUS if is_plain_ascii(text)]

# -------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    """open_clip's tokenizer.py as a module of its own; open_clip/__init__.py (it imports torchvision) never runs."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("reference absent: install it with `pip install --no-deps open_clip_torch==3.3.0`")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    file_spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer folders in the hub layout: vocab.json (the 49,408-entry token -> id dict) and merges.txt
    ("#version: 0.2", then "a b" per merge, as transformers writes them), with SD 1.5's / SD 2.1's configs."""
    vocab, merges = load_clip_bpe()
    folders = {}
    for name, model in SD_TOKENIZERS.items():
        configs = REFERENCE_CONFIGS / model / "tokenizer"
        if not configs.is_dir():
            pytest.skip(f"shared/reference_configs not found at {REFERENCE_CONFIGS}")
        folder = folders[name] = tmp_path_factory.mktemp(name)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")
        for config in configs.iterdir():
            shutil.copy(config, folder / config.name)
    return folders


@pytest.fixture(scope="module")
def hf(model_folders):
    """transformers' CLIPTokenizer for each folder."""
    transformers = pytest.importorskip("transformers")
    return {name: transformers.CLIPTokenizer.from_pretrained(folder) for name, folder in model_folders.items()}


@pytest.fixture(scope="module")
def from_folders(model_folders) -> dict[str, CLIPTokenizer]:
    """minidiff's CLIPTokenizer for each folder, shared by the tests that add no tokens."""
    return {name: CLIPTokenizer.from_folder(folder) for name, folder in model_folders.items()}


def first_mismatches(texts, got, want, limit=5) -> list:
    return [(text, g, w) for text, g, w in zip(texts, got, want, strict=True) if g != w][:limit]


# ------------------------------------------------------------------------------------------------- open_clip


def test_corpus_is_large_and_diverse():
    assert len(CORPUS) > 3000 and len(PLAIN) > 2000
    assert sum(not text.isascii() for text in CORPUS) > 1000


def test_vocab_and_merges_match_open_clip(open_clip_tokenizer):
    reference = open_clip_tokenizer.SimpleTokenizer()
    vocab, merges = load_clip_bpe()
    # open_clip renamed the special tokens; openai/CLIP and the hub call them <|startoftext|>, <|endoftext|>
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert vocab == {renamed.get(token, token): i for token, i in reference.encoder.items()}
    assert dict(zip(merges, range(len(merges)), strict=True)) == reference.bpe_ranks


def test_ids_match_open_clip_on_corpus(ours, open_clip_tokenizer):
    got = CLIPTokenizer(pad_token="!")(CORPUS, **SD_CALL).input_ids  # open_clip pads with zeros
    want = open_clip_tokenizer.tokenize(CORPUS, context_length=77)
    assert got.dtype == torch.int64 and got.shape == want.shape == (len(CORPUS), 77)
    assert torch.equal(got, want), first_mismatches(CORPUS, got.tolist(), want.tolist())
    # untruncated too, so long prompts are compared to the end
    reference = open_clip_tokenizer._tokenizer
    got = [ours.encode(text) for text in CORPUS]
    want = [reference.encode(text) for text in CORPUS]
    assert got == want, first_mismatches(CORPUS, got, want)


def test_decode_matches_open_clip(ours, open_clip_tokenizer):
    ids = [ours.encode(text) for text in CORPUS]
    got = [ours.decode(i) for i in ids]
    # minidiff decodes as transformers does, which strips the ends; CLIP's decode keeps a trailing space
    want = [open_clip_tokenizer._tokenizer.decode(i).strip() for i in ids]
    assert got == want, first_mismatches(CORPUS, got, want)


# ---------------------------------------------------------------------------------------------- transformers


def test_from_folder_reads_vocab_merges_and_pad(ours, model_folders):
    sd1, sd2 = CLIPTokenizer.from_folder(model_folders["sd1"]), CLIPTokenizer.from_folder(model_folders["sd2"])
    # SD 2.x: tokenizer_config.json says "<|endoftext|>", special_tokens_map.json says "!" and wins
    assert json.loads((model_folders["sd2"] / "tokenizer_config.json").read_text())["pad_token"] == "<|endoftext|>"
    assert (sd1.pad_token_id, sd2.pad_token_id) == (EOS, 0)
    assert sd1.model_max_length == sd2.model_max_length == 77 and sd1.vocab_size == 49408
    assert len(sd2.bpe_ranks) == 48894 and ("#version:", "0.2") not in sd2.bpe_ranks
    texts = CORPUS[::4]
    assert [sd2.encode(text) for text in texts] == [ours.encode(text) for text in texts]


@pytest.mark.parametrize("model", ["sd1", "sd2"])
def test_ids_match_transformers_on_ascii(model, hf, model_folders):
    ref, tok = hf[model], CLIPTokenizer.from_folder(model_folders[model])
    assert ref.pad_token_id == tok.pad_token_id == {"sd1": EOS, "sd2": 0}[model]
    # with pad "!", transformers also cuts every "!" out of the prompt: see test_transformers_sd2_exclamation_marks
    texts = PLAIN if model == "sd1" else [text for text in PLAIN if "!" not in text]
    for max_length in (77, 16):  # 16 truncates most of the corpus
        got = tok(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        want = ref(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        assert torch.equal(got.input_ids, want.input_ids), first_mismatches(texts, got.input_ids.tolist(),
                                                                           want.input_ids.tolist())
        assert torch.equal(got.attention_mask, want.attention_mask)
    got = tok(texts, max_length=77, truncation=True)
    want = ref(texts, max_length=77, truncation=True)
    assert got.input_ids == want["input_ids"] and got.attention_mask == want["attention_mask"]
    # the call diffusers' pipelines make, on one prompt
    prompt = texts[100]
    want = ref(prompt, padding="max_length", max_length=ref.model_max_length, truncation=True, return_tensors="pt")
    got = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    assert torch.equal(got.input_ids, want.input_ids)


# transformers' call, argument by argument: every padding and truncation strategy it accepts for one sequence,
# with and without max_length (2 and 5 cut most prompts, 16 some, 77 only the long ones), each with every
# return_tensors / return_attention_mask, on a batch of mixed lengths, a batch of equal lengths and single prompts
# (without "!", which transformers' SD 2.x tokenizer cuts out: see test_transformers_sd2_exclamation_marks)
NO_BANG = [text for text in PLAIN if "!" not in text]
CALL_INPUTS = [NO_BANG[::97], ["a cat", "a dog"], "a photo of an astronaut riding a horse", "", " ".join(NO_BANG[:30])]


def call(tokenizer, text, **kwargs):
    """tokenizer(text, **kwargs) as plain python values, tensors as ("pt", dtype, lists), or the ValueError."""
    try:
        out = tokenizer(text, **kwargs)
    except ValueError:
        return ValueError
    return {key: ("pt", value.dtype, value.tolist()) if isinstance(value, torch.Tensor) else value
            for key, value in out.items()}


@pytest.mark.filterwarnings("ignore:`max_length` is ignored")
@pytest.mark.parametrize("max_length", [None, 2, 5, 16, 77])
@pytest.mark.parametrize("truncation", [None, False, True, "longest_first", "only_first", "do_not_truncate"])
@pytest.mark.parametrize("padding", [False, True, "longest", "max_length", "do_not_pad"])
@pytest.mark.parametrize("model", ["sd1", "sd2"])
def test_call_matches_transformers(model, padding, truncation, max_length, hf, from_folders):
    ref, tok = hf[model], from_folders[model]
    kwargs = {"padding": padding, "truncation": truncation, "max_length": max_length}
    assert len(set(map(len, tok(CALL_INPUTS[0]).input_ids))) > 10 and len(tok(CALL_INPUTS[-1]).input_ids) > 77
    for text in CALL_INPUTS:
        for return_tensors in (None, "pt"):
            for return_attention_mask in (None, True, False):
                options = kwargs | {"return_tensors": return_tensors, "return_attention_mask": return_attention_mask}
                want = call(ref, text, **options)
                assert call(tok, text, **options) == want, (text, options)


def test_default_call_does_not_pad(ours, hf):
    """transformers' default: no padding, no truncation, lists; one prompt gives one flat list of ids."""
    prompt = "a photo of an astronaut riding a horse"
    out = ours(prompt)
    assert out.input_ids == hf["sd1"](prompt).input_ids == [BOS, 320, 1125, 539, 550, 18376, 6765, 320, 4558, EOS]
    assert out.attention_mask == [1] * 10  # returned by default, as in transformers
    out = ours([prompt, "a cat"])
    assert out.input_ids == hf["sd1"]([prompt, "a cat"]).input_ids and out.input_ids[1] == [BOS, 320, 2368, EOS]
    assert ours(prompt, return_tensors="pt").input_ids.shape == (1, 10)


def test_add_one_string_like_transformers(model_folders):
    """add_tokens("<x>") adds one token "<x>" (not its three characters, which are in the vocabulary already)."""
    transformers = pytest.importorskip("transformers")
    tok = CLIPTokenizer.from_folder(model_folders["sd1"])
    ref = transformers.CLIPTokenizer.from_pretrained(model_folders["sd1"])
    assert tok.add_tokens("<x>") == ref.add_tokens("<x>") == 1
    assert tok.add_tokens("<x>") == ref.add_tokens("<x>") == 0
    assert tok.add_tokens(["<y>", "<y>", "<z>"]) == ref.add_tokens(["<y>", "<y>", "<z>"]) == 2
    # the textual-inversion flow: the new id, one more row for the text encoder
    assert tok.convert_tokens_to_ids("<x>") == ref.convert_tokens_to_ids("<x>") == 49408
    assert tok.convert_tokens_to_ids(["<z>", "a</w>"]) == ref.convert_tokens_to_ids(["<z>", "a</w>"]) == [49410, 320]
    assert len(tok) == len(ref) == 49411 and tok.vocab_size == ref.vocab_size == 49408
    assert tok.get_vocab() == ref.get_vocab() and len(tok.get_vocab()) == 49411
    for text in ["a photo of <x>", "<x><y> z", "A <X>, by <z>", "a<x>b", "<x>"]:
        ids = tok(text).input_ids
        assert ids == ref(text).input_ids, text
        assert tok.tokenize(text) == ref.tokenize(text), text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    assert tok.decoder[49408] == ref.convert_ids_to_tokens(49408) == "<x>"
    assert tok.decode(49409) == ref.decode(49409) == "<y>"


@pytest.mark.parametrize("model", ["sd1", "sd2"])
def test_vocabulary_matches_transformers(model, hf, from_folders, open_clip_tokenizer):
    ref, tok = hf[model], from_folders[model]
    assert (tok.vocab_size, len(tok), tok.model_max_length) == (ref.vocab_size, len(ref), ref.model_max_length)
    assert (tok.pad_token, tok.pad_token_id) == (ref.pad_token, ref.pad_token_id) == {"sd1": (ref.eos_token, EOS),
                                                                                       "sd2": ("!", 0)}[model]
    assert (tok.bos_token_id, tok.eos_token_id) == (ref.bos_token_id, ref.eos_token_id) == (BOS, EOS)
    assert tok.get_vocab() == tok.encoder == ref.get_vocab()
    # decoder: id -> token string, as transformers' convert_ids_to_tokens and CLIP's own decoder have it
    assert tok.decoder == {i: ref.convert_ids_to_tokens(i) for i in range(49408)}
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert tok.decoder == {i: renamed.get(t, t) for i, t in open_clip_tokenizer.SimpleTokenizer().decoder.items()}
    texts = PLAIN[::7] if model == "sd1" else [text for text in PLAIN[::7] if "!" not in text]
    got, want = [tok.tokenize(text) for text in texts], [ref.tokenize(text) for text in texts]
    assert got == want, first_mismatches(texts, got, want)


@pytest.mark.parametrize("model", ["sd1", "sd2"])
def test_decode_matches_transformers(model, hf, from_folders):
    ref, tok = hf[model], from_folders[model]
    # one id at a time, as the course prints a prompt token by token: ints, 0-d tensors, one-element lists
    got, want = [tok.decode(i) for i in range(49408)], [ref.decode(i) for i in range(49408)]
    assert got == want, [(i, g, w) for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w][:5]
    assert tok.decode(torch.tensor(550)) == ref.decode(torch.tensor(550)) == "an" and tok.decode([269]) == "."
    # whole prompts with BOS, EOS and pads, skipping the special tokens or not; rows of a tensor and of lists
    texts = PLAIN[::5] if model == "sd1" else [text for text in PLAIN[::5] if "!" not in text]
    ids = tok(texts, **SD_CALL).input_ids
    rows = ids.tolist() + [[BOS, 320, EOS, 0, 0], [0, 256, 995, 0], [49407, 320], [], [3306, 269, 2368, 267]]
    for skip in (False, True):
        got, want = [tok.decode(row, skip) for row in rows], [ref.decode(row, skip_special_tokens=skip) for row in rows]
        assert got == want, first_mismatches(rows, got, want)
        assert tok.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip) == got[: len(ids)]
    prompt = "a photo, of it's don't . ? !"  # no clean-up of the spaces before punctuation, as in transformers
    assert tok.decode(tok(prompt).input_ids) == "<|startoftext|>a photo , of it 's don 't . ? ! <|endoftext|>"


def test_course_prints_tokens_one_by_one(ours, hf):
    """Unit 3 and the Stable Diffusion Deep Dive print a prompt's first ids with decode(t) and decoder.get(int(t))."""
    ref = hf["sd1"]
    text_input = ours("An example prompt", padding="max_length", max_length=ours.model_max_length, truncation=True,
                      return_tensors="pt")
    want = ref("An example prompt", padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(text_input["input_ids"], want["input_ids"])
    decoded = [ours.decode(t) for t in text_input["input_ids"][0][:8]]
    assert decoded == [ref.decode(t) for t in want["input_ids"][0][:8]]
    assert decoded == ["<|startoftext|>", "an", "example", "prompt"] + ["<|endoftext|>"] * 4
    tokens = [ours.decoder.get(int(t)) for t in text_input["input_ids"][0][:5]]
    assert tokens == ["<|startoftext|>", "an</w>", "example</w>", "prompt</w>", "<|endoftext|>"]


# Where transformers 5 (no ftfy, no html.unescape; NFC instead) tokenizes differently from the original CLIP.
WITHOUT_FTFY = ["\u201ca cat\u201d", "it\u2019s", "ﬁne ﬂowers", "ＡＢＣ １２３", "Tom &amp; Jerry", "&lt;b&gt;",
                "cafÃ©", "Ã¼ber", "â€œquotedâ€\x9d", "a\x00b"]


def test_transformers_differs_without_ftfy(ours, open_clip_tokenizer, hf):
    for text in WITHOUT_FTFY:
        ids = ours.encode(text)
        assert ids == open_clip_tokenizer._tokenizer.encode(text), text
        assert ids != hf["sd1"](text).input_ids[1:-1], text


def test_transformers_sd2_exclamation_marks(open_clip_tokenizer, hf, model_folders):
    """With SD 2.x's pad token "!", transformers makes "!" a special token and cuts it out of the prompt as id 0
    (the pad id), where open_clip, whose tokenizer SD 2.x's text encoder was trained with, reads "!</w>" (256)
    or "!!!</w>" (995). minidiff follows open_clip: pad_token only chooses what fills the row after EOS."""
    sd2 = CLIPTokenizer.from_folder(model_folders["sd2"])
    assert sd2.encode("wow!!!") == open_clip_tokenizer._tokenizer.encode("wow!!!") == [2781, 995]
    assert hf["sd2"]("wow!!!").input_ids[1:-1] == [2781, 0, 0, 0]
    assert sd2.encode("a cat!") == [320, 2368, 256] and hf["sd2"]("a cat!").input_ids[1:-1] == [320, 2368, 0]
    assert hf["sd1"]("wow!!!").input_ids[1:-1] == [2781, 995]  # SD 1.x pads with EOS, so "!" is ordinary there


def test_literal_special_tokens(ours, hf, open_clip_tokenizer):
    """A prompt that spells "<|endoftext|>" gets the EOS id, as in openai/CLIP and transformers. open_clip renamed
    its special tokens to <start_of_text>/<end_of_text>, so there it is ordinary text."""
    text = "a <|endoftext|> b <|startoftext|>"
    assert ours.encode(text) == hf["sd1"](text).input_ids[1:-1] == [320, EOS, 321, BOS]
    assert open_clip_tokenizer._tokenizer.encode(text) != ours.encode(text)


def test_added_tokens_match_transformers(model_folders):
    transformers = pytest.importorskip("transformers")
    tok = CLIPTokenizer.from_folder(model_folders["sd1"])
    ref = transformers.CLIPTokenizer.from_pretrained(model_folders["sd1"])  # a fresh one: this test adds tokens
    new = ["<cat-toy>", "<Dog-Toy>", "<cat-toy>-2", "sks", "two words"]
    assert tok.add_tokens(new) == 5 and ref.add_tokens(new) == 5
    assert len(tok) == len(ref) == 49413 and tok.vocab_size == 49408
    assert tok.convert_tokens_to_ids(new) == [49408, 49409, 49410, 49411, 49412]
    texts = ["a photo of <cat-toy>", "a<cat-toy>b", "A <CAT-TOY>, 4k", "<dog-toy> and <Dog-Toy>!!", "<cat-toy>-2",
             "!!<cat-toy>", "<cat-toy><cat-toy>", "asks sksdog", "<cat-toy>-3", "a cat toy", "  <cat-toy>  \n",
             "Two  words", "two\twords and two wordsmiths", "two-words"]
    got = tok(texts, **SD_CALL)
    want = ref(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.attention_mask, want.attention_mask)
    assert tok.encode("a photo of <cat-toy>") == [320, 1125, 539, 49408]  # one id, not split by BPE
    assert tok.decode(tok.encode("A photo of <Cat-Toy>")) == "a photo of <cat-toy>"
    # a string already in the vocabulary ("cat" is a BPE token) is not added here; transformers counts it and
    # from then on cuts "cat" out of every word ("concat" -> con, cat)
    assert tok.add_tokens(["cat", "<cat-toy>"]) == 0 and ref.add_tokens(["cat"]) == 1
    assert tok.encode("concat") == [616, 2368] != ref("concat").input_ids[1:-1]


# --------------------------------------------------------------------------------------------- behaviour


def test_long_prompt_is_truncated_with_eos_last(ours):
    text = "a very long prompt " * 40
    ids = ours(text, **SD_CALL).input_ids[0]
    assert ids.shape == (77,) and ids[0] == BOS and ids[-1] == EOS
    assert ids[1:-1].tolist() == ours.encode(text)[:75]
    assert len(ours(text).input_ids) == len(ours.encode(text)) + 2 == 162  # no truncation by default
    # as in transformers, padding to max_length does not cut a longer row; one tensor needs rows of one length
    assert ours(text, padding="max_length", return_tensors="pt").input_ids.shape == (1, 162)
    with pytest.raises(ValueError, match="padding='max_length'"):
        ours([text, "a cat"], padding="max_length", return_tensors="pt")


def test_padding_and_attention_mask(ours):
    sd2 = CLIPTokenizer(pad_token="!")
    out = sd2(["a cat", ""], **SD_CALL)
    assert out.input_ids[0, :5].tolist() == [BOS, 320, 2368, EOS, 0] and out.input_ids[0, 4:].eq(0).all()
    assert out.attention_mask[0].tolist() == [1] * 4 + [0] * 73
    assert ours("a cat", **SD_CALL).input_ids[0, 3:].eq(EOS).all()
    for tok, pad in ((ours, EOS), (sd2, 0)):
        for empty in ("", "   ", "\t\n"):
            assert tok(empty, **SD_CALL).input_ids[0].tolist() == [BOS, EOS] + [pad] * 75


def test_no_padding_mode(ours):
    out = ours(["a cat", "a photo of an astronaut riding a horse", "word " * 100], truncation=True)
    assert [len(ids) for ids in out.input_ids] == [4, 10, 77]
    assert out.input_ids[0] == [BOS, 320, 2368, EOS] and out.input_ids[2][-1] == EOS
    assert out.attention_mask == [[1] * 4, [1] * 10, [1] * 77]


def test_output_access_and_arguments(ours):
    out = ours(["a cat", "a dog"], **SD_CALL)
    assert out["input_ids"] is out.input_ids and out["attention_mask"] is out.attention_mask
    assert out.input_ids.dtype == out.attention_mask.dtype == torch.int64 and out.input_ids.shape == (2, 77)
    assert list(out.keys()) == ["input_ids", "attention_mask"] and "input_ids" in out
    assert out.input_ids[0][:4].tolist() == [BOS, 320, 2368, EOS]
    out = ours("a cat", return_attention_mask=False)
    assert out == {"input_ids": [BOS, 320, 2368, EOS]} and "attention_mask" not in out
    assert not hasattr(out, "attention_mask")
    assert ours("a cat", padding="max_length", max_length=8, return_tensors="pt").input_ids.shape == (1, 8)
    for bad in ({"return_tensors": "np"}, {"padding": None}, {"padding": "bogus"}, {"truncation": "only_second"},
                {"truncation": True, "max_length": 1}):
        with pytest.raises(ValueError):
            ours("a cat", **bad)


def test_decode_round_trip(ours):
    # words separated by single spaces come back as they were cleaned
    words = [text for text in PLAIN if all(c.isalpha() or c == " " for c in text) and text.strip()]
    assert len(words) > 500
    for text in words:
        assert ours.decode(ours.encode(text)) == clean(text), text
    # any text: decoding then encoding again gives the same ids (decode puts a space between pre-split pieces)
    for text in CORPUS:
        ids = ours.encode(text)
        assert ours.encode(ours.decode(ids)) == ids, text


def test_cleaning_steps(ours):
    assert clean("  Tom &amp;amp;\tJerry\n") == "tom & jerry"  # html.unescape twice
    assert clean("cafÃ© ﬁne ＡＢＣ \u201cx\u201d") == "café fine abc \"x\""
    assert ours.encode("A CAT") == ours.encode("a cat") == [320, 2368]
    assert ours.encode("cats") == [3989] and ours.encode("2024") == [273, 271, 273, 275]  # digits one by one
