"""Record formats, chat rendering and the derived assistant masks (on the real SmolLM2 tokenizer)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from student_trainer.data.formats import Document, InvalidRecord, detect_format, to_document
from student_trainer.data.render import DocumentTokenizer
from tests.conftest import DOLLY, needs_dolly



@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from student_trainer.data.tokenizer import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


RECORDS = {
    "messages": {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
    "alpaca": {"instruction": "Say hi", "input": "politely", "output": "Hello."},
    "dolly": {"instruction": "Say hi", "context": "", "response": "Hello.", "category": "open_qa"},
    "prompt_completion": {"prompt": "Hi?", "completion": "Hello."},
    "text": {"text": "Plain text documents are all targets."},
}


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_every_format_is_recognised(fmt: str) -> None:
    assert detect_format(RECORDS[fmt]) == fmt
    document = to_document(RECORDS[fmt])
    if fmt == "text":
        assert document.text and not document.is_chat
    else:
        assert document.turns[-1] == ("assistant", "Hello.")


def test_alpaca_input_and_dolly_context_join_the_prompt() -> None:
    assert to_document(RECORDS["alpaca"]).turns[0] == ("user", "Say hi\n\npolitely")
    dolly = to_document({"instruction": "Q", "context": "C", "response": "A"})
    assert dolly.turns == (("user", "Q\n\nC"), ("assistant", "A"))


@pytest.mark.parametrize(
    "record, fmt, message",
    [
        ({"foo": 1}, None, "unknown format"),
        ([1, 2], None, "expected a JSON object"),
        ({"messages": []}, None, "empty conversation"),
        ({"messages": [{"role": "user", "content": "x"}]}, None, "no non-empty assistant turn"),
        ({"messages": [{"role": "user"}]}, None, r"messages\[0\]"),
        ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, None, "unknown role"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, None, "unknown speaker"),
        ({"instruction": "x", "output": 3}, None, "'output' must be a string"),
        ({"instruction": "", "output": "y"}, None, "prompt/instruction is empty"),
        ({"text": "   "}, None, "'text' is empty"),
        ({"text": "fine"}, "dolly", "'instruction' must be a string, found missing"),
        ({"text": "fine"}, "nonsense", "unknown format 'nonsense'"),
    ],
)
def test_bad_records_say_what_is_wrong(record, fmt, message) -> None:
    with pytest.raises(InvalidRecord, match=message):
        to_document(record, fmt)


def test_assistant_mask_covers_exactly_the_assistant_turns(smollm2_tokenizer) -> None:
    encoder = DocumentTokenizer(smollm2_tokenizer)
    document = Document(turns=(("user", "What is 2+2?"), ("assistant", "It is 4."), ("user", "And 3+3?"), ("assistant", "Six.")))
    encoded = encoder.encode(document)
    targets = smollm2_tokenizer.decode(encoded.tokens[encoded.mask == 1])
    assert targets == "It is 4.<|im_end|>\nSix.<|im_end|>\n"
    context = smollm2_tokenizer.decode(encoded.tokens[encoded.mask == 0])
    assert "What is 2+2?" in context and "And 3+3?" in context and "<|im_start|>assistant\n" in context
    assert "It is 4" not in context
    # the default system prompt SmolLM2's template inserts is context, never a target
    assert "You are a helpful AI assistant named SmolLM" in context


@needs_dolly
def test_masks_on_real_dolly_data(smollm2_tokenizer) -> None:
    encoder = DocumentTokenizer(smollm2_tokenizer)
    with open(DOLLY) as fh:
        records = [json.loads(line) for _, line in zip(range(40), fh)]
    for record in records:
        encoded = encoder.encode(to_document(record))
        answer = smollm2_tokenizer.decode(encoded.tokens[encoded.mask == 1])
        assert answer == record["response"] + "<|im_end|>\n"
        assert 0 < encoded.mask.sum() < len(encoded.tokens)


def test_text_documents_train_on_every_non_special_token(smollm2_tokenizer) -> None:
    encoded = DocumentTokenizer(smollm2_tokenizer).encode(Document(text="The quick brown fox."))
    assert encoded.mask.all()
    assert smollm2_tokenizer.decode(encoded.tokens) == "The quick brown fox."


def test_a_tokenizer_without_a_template_falls_back_to_chatml(tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoded = DocumentTokenizer(tokenizer).encode(to_document(RECORDS["messages"]))
    assert tokenizer.decode(encoded.tokens[encoded.mask == 1]) == "Hello.<|im_end|>\n"
    assert np.asarray(encoded.tokens).dtype == np.int32
