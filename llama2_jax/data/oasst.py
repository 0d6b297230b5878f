"""Reader of OpenAssistant Conversations (oasst1; Köpf et al., 2023), one message per JSONL line.

Messages form trees through `parent_id`. Sibling assistant replies carry a `rank` (0 is the best,
merged from several human rankings) and most carry human `labels`, among them `quality`: the mean
of the annotators' scores in [0, 1]. Deleted messages, messages that failed review
(`review_result` false) and everything below them are left out, and so are messages whose parent
is not in the file.

From one file the reader yields:
  * dialogues: from each root prompt, the best-ranked reply at every level (rank 0, or the first
    by date where replies are unranked), ending with an assistant reply;
  * preference pairs: every two ranked assistant replies to the same message, the better-ranked
    one chosen, with the conversation up to that message as context;
  * prompts: the root prompts.

Rating of a pair, from the quality-label difference d = quality(chosen) - quality(rejected):
  d >= 0.5 significantly better, 0.25 <= d < 0.5 better, 0.1 <= d < 0.25 slightly better, and
  d < 0.1 negligibly better or unsure, which includes pairs whose labels disagree with the ranking.
When either reply lacks a quality label, the rank gap g = rank(rejected) - rank(chosen) decides:
  g >= 3 significantly better, g = 2 better, g = 1 slightly better.
On the English validation split these thresholds put about 10%, 23%, 11% and 56% of the labelled
pairs in the four classes. The thresholds are this project's choice; oasst1 defines no such scale.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterator, Mapping

from llama2_jax.chat import Message
from llama2_jax.data.errors import BadRecordHandler, DataError
from llama2_jax.data.readers import SKIP_HINT, read_valid, text_field
from llama2_jax.data.records import Dialogue, PreferencePair, Prompt, group_key
from llama2_jax.losses.reward import Rating

_ROLES = {"prompter": "user", "assistant": "assistant"}

# (minimum quality difference, rating), tried in order.
QUALITY_GAP_RATINGS = ((0.5, Rating.SIGNIFICANTLY_BETTER), (0.25, Rating.BETTER),
                       (0.1, Rating.SLIGHTLY_BETTER))
RANK_GAP_RATINGS = {1: Rating.SLIGHTLY_BETTER, 2: Rating.BETTER}


@dataclasses.dataclass(frozen=True)
class OasstMessage:
  """The fields of one oasst1 message that the reader uses; `line` is its line in the file."""

  id: str
  parent_id: str | None
  role: str
  text: str
  rank: int | None
  quality: float | None
  created: str
  line: int


def _optional_field(record, name, types, path, line):
  value = record.get(name)
  if value is not None and not isinstance(value, types):
    raise DataError(f"must be {types} or null, got {type(value).__name__}.", path=path,
                    line=line, field=name, fix=SKIP_HINT)
  return value


def _quality(record: Mapping[str, Any], path: str, line: int) -> float | None:
  labels = _optional_field(record, "labels", dict, path, line)
  if not labels:
    return None
  names, values = labels.get("name"), labels.get("value")
  if not isinstance(names, list) or not isinstance(values, list) or len(names) != len(values):
    raise DataError("must hold lists 'name' and 'value' of equal length.", path=path, line=line,
                    field="labels", fix=SKIP_HINT)
  return dict(zip(names, values)).get("quality")


def _parse_message(path: str, line: int, record: Mapping[str, Any]) -> OasstMessage | None:
  role = text_field(record, "role", path, line)
  if role not in _ROLES:
    raise DataError(f"is {role!r}; expected 'prompter' or 'assistant'.", path=path, line=line,
                    field="role", fix=SKIP_HINT)
  if record.get("deleted") or record.get("review_result") is False:
    return None
  rank = _optional_field(record, "rank", int, path, line)
  return OasstMessage(
      id=text_field(record, "message_id", path, line),
      parent_id=_optional_field(record, "parent_id", str, path, line),
      role=_ROLES[role],
      text=text_field(record, "text", path, line).strip(),
      rank=rank,
      quality=_quality(record, path, line),
      created=str(record.get("created_date") or ""),
      line=line)


class _Forest:
  """The valid messages of one file, with children sorted best first."""

  def __init__(self, path: str, handler: BadRecordHandler):
    self.path = path
    nodes = list(read_valid(path, handler, lambda line, record: _parse_message(path, line, record)))
    self.by_id = {node.id: node for node in nodes}
    self.children: dict[str, list[OasstMessage]] = {}
    for node in nodes:
      if node.parent_id is not None:
        self.children.setdefault(node.parent_id, []).append(node)
    for siblings in self.children.values():
      siblings.sort(key=lambda n: (n.rank is None, n.rank or 0, n.created, n.id))
    self.roots = [n for n in nodes if n.parent_id is None and n.role == "user"]

  def path_to(self, node: OasstMessage) -> list[OasstMessage] | None:
    """Returns root ... node, or None if an ancestor is missing (deleted or not in the file)."""
    chain = [node]
    while chain[-1].parent_id is not None:
      parent = self.by_id.get(chain[-1].parent_id)
      if parent is None:
        return None
      chain.append(parent)
    return chain[::-1]

  def origin(self, node: OasstMessage) -> str:
    return f"{self.path}:{node.line}"


def _messages(nodes: list[OasstMessage]) -> tuple[Message, ...]:
  return tuple(Message(n.role, n.text) for n in nodes)


def pair_rating(chosen: OasstMessage, rejected: OasstMessage) -> Rating:
  """Maps a ranked pair to a Llama 2 rating class as the module docstring describes."""
  if chosen.quality is not None and rejected.quality is not None:
    difference = chosen.quality - rejected.quality
    for threshold, rating in QUALITY_GAP_RATINGS:
      if difference >= threshold:
        return rating
    return Rating.NEGLIGIBLY_BETTER_OR_UNSURE
  gap = rejected.rank - chosen.rank
  return RANK_GAP_RATINGS.get(gap, Rating.SIGNIFICANTLY_BETTER)


def read_dialogues(path: str, handler: BadRecordHandler, *, source: str,
                   is_safety: bool) -> Iterator[Dialogue]:
  """Yields the best-ranked thread of each message tree."""
  del is_safety
  forest = _Forest(path, handler)
  for root in forest.roots:
    thread = [root]
    while forest.children.get(thread[-1].id):
      thread.append(forest.children[thread[-1].id][0])
    if thread[-1].role != "assistant":
      thread.pop()
    if len(thread) < 2:
      continue
    yield Dialogue(id=f"{source}:{root.id}", origin=forest.origin(thread[-1]), source=source,
                   group=group_key(root.text), messages=_messages(thread))


def read_pairs(path: str, handler: BadRecordHandler, *, source: str,
               is_safety: bool) -> Iterator[PreferencePair]:
  """Yields every pair of ranked assistant replies to the same message."""
  del is_safety
  forest = _Forest(path, handler)
  for parent_id, siblings in forest.children.items():
    parent = forest.by_id.get(parent_id)
    ranked = [n for n in siblings if n.role == "assistant" and n.rank is not None]
    context = forest.path_to(parent) if parent is not None and len(ranked) > 1 else None
    if context is None:
      continue
    for chosen, rejected in itertools.combinations(ranked, 2):
      if chosen.rank == rejected.rank:
        continue
      yield PreferencePair(
          id=f"{source}:{chosen.id}>{rejected.id}", origin=forest.origin(chosen), source=source,
          group=group_key(context[0].text), context=_messages(context), chosen=chosen.text,
          rejected=rejected.text, rating=int(pair_rating(chosen, rejected)))


def read_prompts(path: str, handler: BadRecordHandler, *, source: str,
                 is_safety: bool) -> Iterator[Prompt]:
  """Yields the root prompt of each message tree, once per distinct text."""
  forest = _Forest(path, handler)
  seen = set()
  for root in forest.roots:
    key = group_key(root.text)
    if key not in seen:
      seen.add(key)
      yield Prompt(id=f"{source}:{root.id}", origin=forest.origin(root), source=source,
                   group=key, text=root.text, is_safety=is_safety)
