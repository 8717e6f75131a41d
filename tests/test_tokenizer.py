"""qwen1m.tokenizer and qwen1m.detokenizer against transformers as the oracle.

The folder comes from tests/tokenizer_utils.py: a small trained byte-level BPE with Qwen's
pipeline, so merges really do split multi-byte characters across tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizer_utils import make_tokenizer_folder

from qwen1m.detokenizer import IncrementalDetokenizer
from qwen1m.errors import CheckpointError, ConfigError, RequestError
from qwen1m.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).parent / "fixtures"
QWEN25_TEMPLATE = (FIXTURES / "qwen2_5_chat_template.jinja").read_text(encoding="utf-8")
CHATML_TEMPLATE = (FIXTURES / "chatml_template.jinja").read_text(encoding="utf-8")

TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！今天天气很好。",
    "日本語のテキスト、東京。",
    "Emoji 😀😃 🚀 👍🏽 ❤️ 🧑‍🚀 (a ZWJ sequence)",
    "café naïve ﬁ Å Å",  # NFC normalization: decomposed and composed forms
    "   leading spaces, trailing spaces   ",
    "tabs\tand\n\nnewlines\r\n  indented\n\t\tcode",
    "a  b   c    d",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|>",
    '<tool_call>\n{"name": "f"}\n</tool_call>',
    "<|im_start <|im_end|> |im_end|> <|unknown|>",
    "I'm sure they'll say we've done it, it's OK'd.",
    "12345678901234567890 3.14159 -42",
    "def f(x):\n    return x ** 2  # 平方\n",
    "\u200b zero-width \u00a0 nbsp \ufeff bom",
]

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "What is 2+2?"}],
    "system_multi_turn": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "Fine. 你好！"},
        {"role": "user", "content": "Tell me a joke 😀"},
    ],
    "no_system_multi_turn": [
        {"role": "user", "content": "Summarize: long context models."},
        {"role": "assistant", "content": "They read a lot."},
        {"role": "user", "content": "  spaces and\nnewlines  "},
        {"role": "assistant", "content": ""},
    ],
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city (température, 天气) & <units>.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. 北京"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {"name": "search", "parameters": {"type": "object", "properties": {}}},
}

TOOL_CONVERSATION = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "Weather in Paris and 北京?"},
    {
        "role": "assistant",
        "content": None,  # OpenAI clients send None here; transformers drops None-valued keys
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {
                "id": "c2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "北京", "unit": "celsius"}},
            },
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": '{"temp": 3, "sky": "晴"}'},
    {"role": "assistant", "content": "Paris 21°C, 北京 3°C."},
    {"role": "user", "content": "Thanks"},
    {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [{"name": "search", "arguments": '{"q": "x"}'}],
    },
    {"role": "tool", "content": "nothing found"},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "qwen25": make_tokenizer_folder(root / "qwen25", QWEN25_TEMPLATE),
        "chatml": make_tokenizer_folder(root / "chatml", CHATML_TEMPLATE),
    }


@pytest.fixture(scope="module")
def pair(folders):
    """(ours, transformers') for the Qwen2.5-template folder."""
    return Tokenizer.from_folder(folders["qwen25"]), transformers.AutoTokenizer.from_pretrained(
        folders["qwen25"]
    )


# -- encode / decode ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(pair, text):
    ours, hf = pair
    assert ours.encode(text) == hf(text)["input_ids"] == hf.encode(text, add_special_tokens=False)
    assert ours.encode(text, add_special_tokens=True) == hf.encode(text, add_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(pair, text, skip):
    ours, hf = pair
    ids = hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_decode_random_ids_matches_transformers(pair):
    # Random ids include broken UTF-8 byte runs and special tokens mid-text.
    ours, hf = pair
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_decode_default_skips_special_tokens(pair):
    ours, _ = pair
    ids = ours.encode("<|im_start|>hi<|im_end|><tool_call>")
    assert ours.decode(ids) == "hi<tool_call>"  # <tool_call> is an added but non-special token, as in Qwen


def test_vocab_and_special_ids(pair):
    ours, hf = pair
    assert ours.vocab_size == len(hf)
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "a"):
        assert ours.token_to_id(token) == hf.convert_tokens_to_ids(token)
    assert ours.token_to_id("<|no such token|>") is None
    assert ours.eos_token_ids == (hf.eos_token_id, hf.convert_tokens_to_ids("<|endoftext|>"))
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.chat_template == hf.chat_template == QWEN25_TEMPLATE


def test_eos_ids_are_ordered_union(folders, tmp_path):
    folder = make_tokenizer_folder(tmp_path / "t", CHATML_TEMPLATE)
    base = Tokenizer.from_folder(folder)
    im_end, endoftext, im_start = (
        base.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>", "<|im_start|>")
    )
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [endoftext, im_start]}))
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = endoftext  # a bare int is allowed too
    (folder / "generation_config.json").write_text(json.dumps(gen))
    assert Tokenizer.from_folder(folder).eos_token_ids == (im_end, endoftext, im_start)


def test_special_tokens_as_added_token_dicts(tmp_path):
    folder = make_tokenizer_folder(tmp_path / "t", None)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["eos_token"] = {"__type": "AddedToken", "content": "<|im_end|>", "special": True}
    cfg["pad_token"] = {"content": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_folder(folder)
    assert tok.eos_token_ids[0] == tok.token_to_id("<|im_end|>")
    assert tok.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.special_tokens["eos_token"] == "<|im_end|>"


# -- chat templates ----------------------------------------------------------------------------------


def test_chatml_known_rendering(folders):
    tok = Tokenizer.from_folder(folders["chatml"])
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    )
    assert (
        text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("template", ["qwen25", "chatml"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(folders, template, conversation, add_generation_prompt):
    ours = Tokenizer.from_folder(folders[template])
    hf = transformers.AutoTokenizer.from_pretrained(folders[template])
    messages = CONVERSATIONS[conversation]
    expected = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    expected_ids = hf.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    if isinstance(expected_ids, dict) or hasattr(expected_ids, "keys"):
        expected_ids = expected_ids["input_ids"]
    assert ours.encode(expected) == list(expected_ids)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_system", [True, False])
def test_qwen25_tools_match_transformers(pair, add_generation_prompt, with_system):
    ours, hf = pair
    messages = TOOL_CONVERSATION if with_system else TOOL_CONVERSATION[1:]
    tools = [WEATHER_TOOL, SEARCH_TOOL]
    expected = hf.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    got = ours.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt)
    assert got == expected
    assert "<tools>" in got and "<tool_response>" in got and "<tool_call>" in got
    assert "北京" in got and "\\u" not in got  # tojson keeps non-ASCII, as transformers' filter does
    assert "None" not in got


def test_qwen25_tool_messages_without_tools(pair):
    ours, hf = pair
    expected = hf.apply_chat_template(TOOL_CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(TOOL_CONVERSATION) == expected


def test_template_kwargs_and_special_token_variables(tmp_path):
    template = (
        "{{ bos_token is defined }}|{{ eos_token }}|{{ pad_token }}|{{ greeting }}|{{ flag }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}|"
        "{{ strftime_now('%Y') | length }}|{{ {'b': '<é>', 'a': 1} | tojson }}|"
        "{{ [1, 2] | tojson(indent=1) }}|"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|"
        "{{ messages[0].name }}|\n    {% if true %}\n  lstrip and trim blocks\n    {% endif %}\n"
        "{% generation %}generated {{ messages[-1].content }}{% endgeneration %}"
    )
    folder = make_tokenizer_folder(tmp_path / "t", template)
    ours = Tokenizer.from_folder(folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "one", "name": None}, {"role": "user", "content": "two"}]
    expected = hf.apply_chat_template(
        messages, tokenize=False, greeting="hé", flag=True, eos_token="<override>"
    )
    got = ours.apply_chat_template(messages, greeting="hé", flag=True, eos_token="<override>")
    assert got == expected
    assert got.startswith("False|<override>|<|endoftext|>|hé|True|one|4|")


def test_chat_template_jinja_file_takes_priority(tmp_path):
    folder = make_tokenizer_folder(tmp_path / "t", QWEN25_TEMPLATE)
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")
    ours = Tokenizer.from_folder(folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.chat_template == CHATML_TEMPLATE
    messages = CONVERSATIONS["single_user"]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )


def test_chat_template_list_takes_default_and_tool_use(tmp_path):
    folder = make_tokenizer_folder(tmp_path / "t", None)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [
        {"name": "default", "template": CHATML_TEMPLATE},
        {"name": "tool_use", "template": QWEN25_TEMPLATE},
    ]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours = Tokenizer.from_folder(folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.chat_template == CHATML_TEMPLATE
    messages = CONVERSATIONS["single_user"]
    for tools in (None, [WEATHER_TOOL]):
        expected = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(messages, tools=tools) == expected


# -- streaming detokenizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS + ["你好，世界！😀😃🚀 我们在北京学习。👍🏽❤️ 日本語。" * 3])
@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer_equals_full_decode(pair, text, skip):
    ours, _ = pair
    ids = ours.encode(text)
    detok = IncrementalDetokenizer(ours, skip_special_tokens=skip)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip)


def test_incremental_detokenizer_holds_back_split_characters(pair):
    ours, _ = pair
    ids = ours.encode("🚀")
    assert len(ids) > 1  # the emoji's 4 bytes span several tokens in this vocabulary
    detok = IncrementalDetokenizer(ours)
    assert [detok.add(i) for i in ids] == [""] * (len(ids) - 1) + ["🚀"]
    assert detok.flush() == ""


def test_incremental_detokenizer_random_ids(pair):
    # Broken byte runs must still concatenate to exactly decode(all_ids), U+FFFD included.
    ours, _ = pair
    rng = random.Random(1)
    for _ in range(30):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 60))]
        detok = IncrementalDetokenizer(ours)
        out = "".join(detok.add(i) for i in ids) + detok.flush()
        assert out == ours.decode(ids)


# -- errors ------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Tokenizer.from_folder(tmp_path / "nope")


@pytest.mark.parametrize(
    "files, found",
    [
        ({"vocab.json": "{}", "merges.txt": ""}, "only vocab.json and merges.txt"),
        ({"tokenizer.model": ""}, "only tokenizer.model"),
        ({}, "no tokenizer files"),
    ],
)
def test_missing_tokenizer_json(tmp_path, files, found):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(
        CheckpointError,
        match=f"has {found}.*, but qwen1m supports only fast tokenizers saved as tokenizer.json",
    ):
        Tokenizer.from_folder(tmp_path)


@pytest.mark.parametrize(
    "name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"]
)
def test_invalid_json_names_the_file(tmp_path, name):
    folder = make_tokenizer_folder(tmp_path / "t", CHATML_TEMPLATE)
    (folder / name).write_text('{"eos_token": "<|im_end|>",,}')
    with pytest.raises(
        CheckpointError, match=rf"{name} is not valid JSON: Expecting property name .* at line 1"
    ):
        Tokenizer.from_folder(folder)


def test_unloadable_tokenizer_json(tmp_path):
    folder = make_tokenizer_folder(tmp_path / "t", CHATML_TEMPLATE)
    (folder / "tokenizer.json").write_text('{"model": {"type": "NoSuchModel"}}')
    with pytest.raises(
        CheckpointError, match="tokenizer.json is not a tokenizer the tokenizers library can load"
    ):
        Tokenizer.from_folder(folder)


def test_eos_token_not_in_vocab(tmp_path):
    folder = make_tokenizer_folder(tmp_path / "t", CHATML_TEMPLATE)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "</s>"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"sets eos_token to '</s>', which is not a token of .*tokenizer.json"
    ):
        Tokenizer.from_folder(folder)


@pytest.mark.parametrize(
    "file, field, value, message",
    [
        ("tokenizer_config.json", "chat_template", 3, "field 'chat_template' must be a string or a list"),
        (
            "tokenizer_config.json",
            "chat_template",
            [{"name": "default"}],
            r"field 'chat_template\[0\]' must be an object",
        ),
        (
            "tokenizer_config.json",
            "eos_token",
            7,
            "field 'eos_token' must be a string or an object with 'content'",
        ),
        (
            "generation_config.json",
            "eos_token_id",
            "2",
            "field 'eos_token_id' must be an integer or a list of integers",
        ),
    ],
)
def test_bad_field_types(tmp_path, file, field, value, message):
    folder = make_tokenizer_folder(tmp_path / "t", CHATML_TEMPLATE)
    data = json.loads((folder / file).read_text())
    data[field] = value
    (folder / file).write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=rf"{file} {message}"):
        Tokenizer.from_folder(folder)


def test_missing_chat_template(tmp_path):
    tok = Tokenizer.from_folder(make_tokenizer_folder(tmp_path / "t", None))
    assert tok.chat_template is None
    with pytest.raises(
        ConfigError,
        match=r"tokenizer_config.json has no chat_template \(and there is no chat_template.jinja\)",
    ):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_raise_exception_becomes_request_error(tmp_path):
    template = (
        "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
        "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}ok"
    )
    tok = Tokenizer.from_folder(make_tokenizer_folder(tmp_path / "t", template))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "ok"
    with pytest.raises(
        RequestError,
        match="The chat template rejected the messages: Only user and assistant roles are supported!",
    ):
        tok.apply_chat_template([{"role": "system", "content": "hi"}])


def test_bad_messages_are_request_errors(folders):
    tok = Tokenizer.from_folder(folders["chatml"])
    with pytest.raises(RequestError, match="empty 'messages' list"):
        tok.apply_chat_template([])
    with pytest.raises(RequestError, match=r"messages\[0\] must be an object"):
        tok.apply_chat_template(["hi"])
    with pytest.raises(RequestError, match="could not render the messages"):
        tok.apply_chat_template([{"role": "user"}])  # no content: str + undefined fails


def test_template_syntax_error_is_config_error(tmp_path):
    tok = Tokenizer.from_folder(
        make_tokenizer_folder(tmp_path / "t", "{% for m in messages %}{{ m.content }")
    )
    with pytest.raises(ConfigError, match="chat template 'default' of .* is not valid Jinja"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_sandbox_blocks_attribute_escape(tmp_path):
    tok = Tokenizer.from_folder(make_tokenizer_folder(tmp_path / "t", "{{ messages.__class__.__mro__ }}"))
    with pytest.raises((ConfigError, RequestError)):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
