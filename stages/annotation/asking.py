"""Asking a generator: answers from the answer cache where present, else generated and cached; each answer
validated, a rejected one asked again with a fresh seed, the item rejected with the last reason after that.
The caption and annotate stages ask their models through this, so retries, caching and counting are one rule."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from stages.annotation.backends import ChatRequest, Failed
from stages.annotation.cache import AnswerCache, request_key
from stages.annotation.validate import Invalid


class Asker:
    """`counters` gets `{step}.generated` and `{step}.cached` per request: what a variant really cost."""

    def __init__(self, cache: AnswerCache | None, retries: int):
        self.cache, self.retries = cache, retries
        self.counters: Counter = Counter()

    def answers(self, step: str, generator, settings, requests: list[ChatRequest]) -> list:
        """Answers in request order: cached ones read, the rest generated and cached (failures are not cached)."""
        if self.cache is None:
            self.counters[f"{step}.generated"] += len(requests)
            return generator.generate(requests)
        keys = [request_key(step, settings.answer_fingerprint(), r) for r in requests]
        known = self.cache.get_many(keys)
        todo = [i for i, k in enumerate(keys) if k not in known]
        self.counters[f"{step}.generated"] += len(todo)
        self.counters[f"{step}.cached"] += len(keys) - len(todo)
        fresh = generator.generate([requests[i] for i in todo]) if todo else []
        self.cache.put_many({keys[i]: a for i, a in zip(todo, fresh) if isinstance(a, str)})
        answers = [known.get(k) for k in keys]
        for i, a in zip(todo, fresh):
            answers[i] = a
        return answers

    def with_retries(self, items: list[dict], step: str, generator, settings, request: Callable[[dict, int], ChatRequest],
                     accept: Callable[[dict, str], Any], reject: Callable[[dict, str], None]) -> None:  # fmt: skip
        """Asks for every item until `accept` takes its answer (it raises Invalid to refuse one), at most
        1 + retries times; sets `item[f"{step}_attempts"]`; `reject(item, f"{step}.{reason}")` for the rest."""
        pending = list(items)
        last: dict[int, str] = {}
        for attempt in range(self.retries + 1):
            if not pending:
                return
            answers = self.answers(step, generator, settings, [request(r, attempt) for r in pending])
            still = []
            for r, answer in zip(pending, answers):
                r[f"{step}_attempts"] = attempt + 1
                try:
                    if isinstance(answer, Failed):
                        raise Invalid(answer.reason)
                    accept(r, answer)
                except Invalid as e:
                    last[id(r)] = e.reason
                    still.append(r)
            pending = still
        for r in pending:
            reject(r, f"{step}.{last[id(r)]}")
