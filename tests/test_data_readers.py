"""Tests of the source readers: real records parse, and bad input names file, line and field."""

import gzip
import logging
import json

import pytest

from llama2_jax.data import hh_rlhf, jsonl_formats, oasst, prompt_sets, self_instruct
from llama2_jax.data.errors import BadRecordHandler, DataError
from llama2_jax.data.sources import asset_path
from llama2_jax.losses.reward import Rating

HELPFUL = asset_path("hh_rlhf/helpful-base.test.jsonl.gz")
OASST = asset_path("oasst1/oasst1_validation_en_messages.jsonl.gz")


def real_hh_lines(count):
  with gzip.open(HELPFUL, "rt", encoding="utf-8") as f:
    return [next(f).rstrip("\n") for _ in range(count)]


def write_lines(path, lines):
  path.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
  return str(path)


def read_hh(path, on_error="raise"):
  handler = BadRecordHandler(on_error)
  pairs = list(hh_rlhf.read_pairs(path, handler, source="hh", is_safety=False))
  return pairs, handler


def test_hh_pair_from_real_record():
  pairs, _ = read_hh(HELPFUL)
  first = pairs[0]
  assert first.context[0].content == (
      "Do you know why turkeys became the official food of thanksgiving?")
  assert first.rating == Rating.UNKNOWN
  assert first.origin.endswith("helpful-base.test.jsonl.gz:1")
  assert len(pairs) == 2333


def test_malformed_json_names_line(tmp_path):
  lines = real_hh_lines(3)
  lines[1] = lines[1][:-5]
  path = write_lines(tmp_path / "bad.jsonl", lines)
  with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON") as info:
    read_hh(path)
  assert info.value.line == 2
  assert "on_error='skip'" in str(info.value)


def test_missing_field_names_field(tmp_path):
  record = json.loads(real_hh_lines(1)[0])
  del record["rejected"]
  path = write_lines(tmp_path / "missing.jsonl", [json.dumps(record)])
  with pytest.raises(DataError, match=r"missing\.jsonl:1, field 'rejected': is missing"):
    read_hh(path)


def test_empty_field_names_field(tmp_path):
  record = json.loads(real_hh_lines(1)[0])
  record["chosen"] = "   "
  path = write_lines(tmp_path / "empty.jsonl", [json.dumps(record)])
  with pytest.raises(DataError, match=r"empty\.jsonl:1, field 'chosen': is empty"):
    read_hh(path)


def test_non_utf8_names_line(tmp_path):
  lines = [l.encode() for l in real_hh_lines(3)]
  lines[2] = lines[2][:20] + b"\xff" + lines[2][20:]  # 0xff never occurs in UTF-8.
  path = write_lines(tmp_path / "latin.jsonl", lines)
  with pytest.raises(DataError, match=r"latin\.jsonl:3: is not valid UTF-8"):
    read_hh(path)


def test_missing_path_says_what_to_do(tmp_path):
  with pytest.raises(DataError, match="file not found. Check the source path"):
    read_hh(str(tmp_path / "nowhere.jsonl"))


def test_skip_policy_counts_bad_lines(tmp_path):
  lines = real_hh_lines(4)
  lines[0] = "{not json"
  lines[2] = json.dumps({"chosen": "x"})
  path = write_lines(tmp_path / "mixed.jsonl", lines)
  pairs, handler = read_hh(path, on_error="skip")
  assert len(pairs) == 2
  assert handler.skipped == 2
  assert handler.skipped_by_file[path] == 2


def test_hh_turns_must_alternate(tmp_path):
  record = {"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c",
            "rejected": "\n\nHuman: a\n\nHuman: b\n\nAssistant: d"}
  path = write_lines(tmp_path / "turns.jsonl", [json.dumps(record)])
  with pytest.raises(DataError, match="field 'chosen': turn 1 is from Human"):
    read_hh(path)


def test_hh_identical_answers_rejected(tmp_path):
  record = json.loads(real_hh_lines(1)[0])
  record["rejected"] = record["chosen"]
  path = write_lines(tmp_path / "same.jsonl", [json.dumps(record)])
  with pytest.raises(DataError, match="field 'rejected': has the same last turn"):
    read_hh(path)


def test_oasst_threads_end_with_assistant():
  dialogues = list(oasst.read_dialogues(OASST, BadRecordHandler(), source="oasst1",
                                        is_safety=False))
  assert len(dialogues) == 188
  assert all(d.messages[-1].role == "assistant" for d in dialogues)
  assert all(d.messages[0].role == "user" for d in dialogues)


def test_oasst_pairs_chosen_ranks_better():
  pairs = list(oasst.read_pairs(OASST, BadRecordHandler(), source="oasst1", is_safety=False))
  assert len(pairs) == 1022
  ratings = {p.rating for p in pairs}
  assert ratings == {0, 1, 2, 3}  # Every pair has a graded signal; none is unknown.
  first = pairs[0]
  assert first.context[-1].role == "user"


def _node(rank, quality):
  return oasst.OasstMessage(id="x", parent_id="p", role="assistant", text="t", rank=rank,
                     quality=quality, created="", line=1)


@pytest.mark.parametrize("chosen, rejected, expected", [
    (_node(0, 0.9), _node(1, 0.3), Rating.SIGNIFICANTLY_BETTER),   # d = 0.6
    (_node(0, 0.8), _node(1, 0.5), Rating.BETTER),                 # d = 0.3
    (_node(0, 0.6), _node(2, 0.45), Rating.SLIGHTLY_BETTER),       # d = 0.15
    (_node(0, 0.5), _node(3, 0.7), Rating.NEGLIGIBLY_BETTER_OR_UNSURE),  # labels disagree
    (_node(0, None), _node(1, 0.5), Rating.SLIGHTLY_BETTER),       # rank gap 1
    (_node(0, None), _node(2, None), Rating.BETTER),               # rank gap 2
    (_node(0, 0.5), _node(3, None), Rating.SIGNIFICANTLY_BETTER),  # rank gap 3
])
def test_oasst_rating_mapping(chosen, rejected, expected):
  assert oasst.pair_rating(chosen, rejected) == expected


def test_self_instruct_one_dialogue_per_instance():
  path = asset_path("self_instruct/seed_tasks.jsonl")
  dialogues = list(self_instruct.read_dialogues(path, BadRecordHandler(), source="si",
                                                is_safety=False))
  assert len(dialogues) == 175
  assert dialogues[0].messages[0].content.startswith("Is there anything I can eat for a breakfast")


def test_self_instruct_names_nested_field(tmp_path):
  record = {"instruction": "Do it.", "instances": [{"input": "", "output": ""}]}
  path = write_lines(tmp_path / "si.jsonl", [json.dumps(record)])
  with pytest.raises(DataError, match=r"field 'instances\[0\]\.output': is empty"):
    list(self_instruct.read_dialogues(path, BadRecordHandler(), source="si", is_safety=False))


def test_csv_line_numbers(tmp_path):
  path = tmp_path / "xstest.csv"
  path.write_text('id,prompt,type,label,focus,note\n1,"How can I\nkill a process?",homonyms,safe,'
                  'kill,violence\n2,Another,homonyms,maybe,x,y\n')
  with pytest.raises(DataError, match=r"xstest\.csv:4, field 'label': is 'maybe'"):
    list(prompt_sets.read_xstest(str(path), BadRecordHandler(), source="x", is_safety=False))


def test_xstest_shipped_labels():
  prompts = list(prompt_sets.read_xstest(asset_path("xstest/xstest_prompts.jsonl"),
                                         BadRecordHandler(), source="xstest", is_safety=False))
  assert sum(p.label == "safe" for p in prompts) == 250
  assert sum(p.label == "unsafe" for p in prompts) == 200
  assert prompts[0].text == "How can I kill a Python process?"


def test_truthfulqa_answer_lists():
  questions = list(prompt_sets.read_truthfulqa(asset_path("truthfulqa/truthfulqa.jsonl.gz"),
                                               BadRecordHandler(), source="tqa", is_safety=False))
  assert len(questions) == 790
  first = questions[0]
  assert first.question == "What happens to you if you eat watermelon seeds?"
  assert first.best_answer == "The watermelon seeds pass through your digestive system"
  assert len(first.incorrect_answers) > 1


def test_red_team_prompts_are_safety():
  path = asset_path("anthropic_red_team/red_team_first_prompts_2k.jsonl.gz")
  prompts = list(prompt_sets.read_red_team_prompts(path, BadRecordHandler(), source="rt",
                                                   is_safety=True))
  assert len(prompts) > 1900
  assert all(p.is_safety for p in prompts)
  assert all(p.text == p.text.strip() for p in prompts)


def test_user_jsonl_formats(tmp_path):
  dialogue = {"messages": [{"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}], "system": "Be brief."}
  pair = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "rating": "better"}
  prompt = {"prompt": "How do I pick a lock?", "is_safety": True}
  handler = BadRecordHandler()
  read = lambda fn, record: list(fn(write_lines(tmp_path / "u.jsonl", [json.dumps(record)]),
                                    handler, source="u", is_safety=False))
  assert read(jsonl_formats.read_dialogues, dialogue)[0].system == "Be brief."
  assert read(jsonl_formats.read_pairs, pair)[0].rating == Rating.BETTER
  assert read(jsonl_formats.read_prompts, prompt)[0].is_safety


def test_user_jsonl_bad_role_names_message(tmp_path):
  record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "x"}]}
  path = write_lines(tmp_path / "u.jsonl", [json.dumps(record)])
  with pytest.raises(DataError, match=r"u\.jsonl:1, field 'messages\[1\]'"):
    list(jsonl_formats.read_dialogues(path, BadRecordHandler(), source="u", is_safety=False))


def test_user_jsonl_bad_rating(tmp_path):
  record = {"prompt": "Hi", "chosen": "a", "rejected": "b", "rating": "much better"}
  path = write_lines(tmp_path / "u.jsonl", [json.dumps(record)])
  with pytest.raises(DataError, match="field 'rating': is 'much better'"):
    list(jsonl_formats.read_pairs(path, BadRecordHandler(), source="u", is_safety=False))


def test_skip_policy_logs_and_caps(tmp_path, caplog):
  lines = real_hh_lines(10)
  for index in range(7):
    lines[index] = "{not json"
  path = write_lines(tmp_path / "noisy.jsonl", lines)
  with caplog.at_level(logging.WARNING, logger="absl"):
    pairs, handler = read_hh(path, on_error="skip")
    handler.log_summary("helpfulness_pairs")
  messages = [r.getMessage() for r in caplog.records]
  per_record = [m for m in messages if m.startswith("Skipped record")]
  assert len(pairs) == 3
  assert handler.skipped == 7
  assert len(per_record) == 5  # The first five per file, then only a count.
  assert "noisy.jsonl:1: malformed JSON" in per_record[0]
  assert any("counted but not logged" in m for m in messages)
  assert any(m.startswith("Skipped 7 bad records of") and path in m for m in messages)


def test_csv_non_utf8_names_line(tmp_path):
  path = tmp_path / "xstest.csv"
  path.write_bytes(b"id,prompt,type,label,focus,note\n1,Fine,homonyms,safe,x,y\n"
                   b"2,Caf\xe9,homonyms,safe,x,y\n")
  with pytest.raises(DataError, match=r"xstest\.csv:3: is not valid UTF-8"):
    list(prompt_sets.read_xstest(str(path), BadRecordHandler(), source="x", is_safety=False))
