"""Stop rules: eos, stop ids, stop strings across deltas, min_tokens, lengths, streaming."""

import subprocess
import sys

from jaxserve.engine.sampling import SamplingParams
from jaxserve.engine.stopping import (
    StopChecker,
    StopResult,
    check_stop,
    find_stop_string,
    held_back_chars,
)

EOS = 2


def _feed(checker: StopChecker, deltas: list[str], tokens: list[int] | None = None):
    """Feed text deltas one token at a time; return (index of the finishing step, result, text)."""
    text = ""
    tokens = tokens or [100] * len(deltas)
    for i, (delta, token) in enumerate(zip(deltas, tokens, strict=True)):
        text += delta
        result = checker.check(token, i + 1, text)
        if result is not None:
            return i, result, text
    return None, None, text


def test_stopping_does_not_import_jax():
    code = "import sys, jaxserve.engine.stopping; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eos_stops_unless_ignored():
    checker = StopChecker(SamplingParams(max_tokens=10), [EOS])
    assert checker.check(5, 1, "a") is None
    assert checker.check(EOS, 2, "a") == StopResult("stop")
    ignoring = StopChecker(SamplingParams(max_tokens=10, ignore_eos=True), [EOS])
    assert ignoring.check(EOS, 1, "") is None


def test_stop_token_ids_report_the_id():
    checker = StopChecker(SamplingParams(stop_token_ids=[7, 9]), [EOS])
    assert checker.check(9, 1, "x") == StopResult("stop", stop_reason=9)


def test_min_tokens_defers_eos_and_stop_ids():
    params = SamplingParams(min_tokens=3, stop_token_ids=[7])
    checker = StopChecker(params, [EOS])
    assert checker.check(EOS, 1, "") is None
    assert checker.check(7, 2, "") is None
    assert checker.check(EOS, 3, "") == StopResult("stop")


def test_length_at_max_tokens_and_context_limit():
    checker = StopChecker(SamplingParams(max_tokens=2), [EOS])
    assert checker.check(5, 1, "a") is None
    assert checker.check(5, 2, "ab") == StopResult("length")
    unlimited = StopChecker(SamplingParams(max_tokens=None), [EOS])
    assert unlimited.check(5, 1000, "a") is None
    assert unlimited.check(5, 1001, "ab", at_length_limit=True) == StopResult("length")


def test_eos_on_the_last_allowed_token_is_stop():
    assert StopChecker(SamplingParams(max_tokens=1), [EOS]).check(EOS, 1, "") == StopResult("stop")


def test_stop_string_within_one_delta_truncates():
    checker = StopChecker(SamplingParams(stop=["END"]), [EOS])
    i, result, text = _feed(checker, ["Hello", " worldEND tail"])
    assert i == 1 and result == StopResult("stop", truncate_text_at=11, stop_reason="END")
    assert text[: result.truncate_text_at] == "Hello world"


def test_stop_string_spanning_deltas():
    checker = StopChecker(SamplingParams(stop=["<|end|>"], max_tokens=50), [EOS])
    i, result, text = _feed(checker, ["abc<", "|e", "nd", "|", ">more"])
    assert i == 4 and result.stop_reason == "<|end|>"
    assert text[: result.truncate_text_at] == "abc"


def test_include_stop_str_in_output():
    params = SamplingParams(stop=["END"], include_stop_str_in_output=True)
    _, result, text = _feed(StopChecker(params, [EOS]), ["fooE", "NDbar"])
    assert text[: result.truncate_text_at] == "fooEND"


def test_earliest_of_several_stop_strings_wins():
    params = SamplingParams(stop=["world", "lo"], max_tokens=50)
    _, result, text = _feed(StopChecker(params, [EOS]), ["hel", "lo world"])
    assert result.stop_reason == "lo" and text[: result.truncate_text_at] == "hel"


def test_old_text_is_not_searched_again():
    # A match counts only if it ends inside the new characters (it was checked before else).
    assert find_stop_string("xxabyy", ("ab",), new_chars=2, include_stop_str=False) is None
    assert find_stop_string("xxabyy", ("ab",), new_chars=3, include_stop_str=False) == (2, "ab")
    assert find_stop_string("xxabyy", ("ab",), new_chars=3, include_stop_str=True) == (4, "ab")


def test_stop_strings_ignored_before_min_tokens():
    params = SamplingParams(stop=["!"], min_tokens=2)
    checker = StopChecker(params, [EOS])
    assert checker.check(5, 1, "hi!") is None
    result = checker.check(5, 2, "hi! yes!")
    assert result.truncate_text_at == 7


def test_check_stop_function_form():
    params = SamplingParams(stop=["\n\n"], max_tokens=5)
    result = check_stop(params, [EOS], 5, 3, "a\n\nb", new_chars=2)
    assert result == StopResult("stop", truncate_text_at=1, stop_reason="\n\n")
    assert check_stop(params, [EOS], 5, 5, "abc", new_chars=1) == StopResult("length")


def test_streaming_holds_back_possible_stop_prefix():
    stop = ("<|end|>", "STOP")
    assert held_back_chars("hello <|e", stop) == 3
    assert held_back_chars("hello ST", stop) == 2
    assert held_back_chars("hello S", stop) == 1
    assert held_back_chars("hello", stop) == 0
    assert held_back_chars("anything", ()) == 0
    checker = StopChecker(SamplingParams(stop=list(stop)), [EOS])
    assert checker.emittable_len("abc<|") == 3
    assert checker.emittable_len("abc<|", finished=True) == 5


def test_streamed_text_never_contains_a_stop_string():
    params = SamplingParams(stop=["END"], max_tokens=100)
    checker = StopChecker(params, [EOS])
    deltas = ["The E", "N", "ergy E", "N", "D", " after"]
    text, streamed = "", ""
    for i, delta in enumerate(deltas):
        text += delta
        result = checker.check(100, i + 1, text)
        if result is not None:
            text = text[: result.truncate_text_at]
        streamed = text[: checker.emittable_len(text, finished=result is not None)]
        assert "END" not in streamed
        if result is not None:
            break
    assert streamed == "The ENergy "
