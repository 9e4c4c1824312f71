"""The controller's bounded store of ``BlockProgram``s: least recently used evicted past a limit.

One program serves every block of a class for one input signature, so a model normally needs a
handful. A program per call (a new resolution every generation, a shape that changes each call)
would otherwise grow without end; past ``ToCaConfig.max_captures`` the least recently used one
goes, and a block that needs it again is captured again (logged once: raise ``max_captures``).

Example::

    store = CaptureStore(limit=2, on_evict=lambda key, program: None)
    store.put("a", pa); store.put("b", pb); store.get("a"); store.put("c", pc)   # "b" evicted
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable

log = logging.getLogger("toca_fx")


class CaptureStore:
    def __init__(self, limit: int, on_evict: Callable[[Any, Any], None]):
        self.limit = limit
        self.on_evict = on_evict
        self._programs: OrderedDict = OrderedDict()
        self.evicted = 0                   # programs dropped since transform
        self.recaptured = 0                # programs captured again after they were dropped
        self._gone: set = set()            # keys dropped (to tell a recapture from a first capture)

    def get(self, key):
        p = self._programs.get(key)
        if p is not None:
            self._programs.move_to_end(key)
        return p

    def put(self, key, program) -> None:
        if key in self._gone:
            self._gone.discard(key)
            self.recaptured += 1
            if self.recaptured == 1:
                log.warning("toca_fx: a block capture evicted earlier is needed again (max_captures=%d is too small "
                            "for how this model is called: more shapes or block variants than that); raise "
                            "ToCaConfig.max_captures to stop recapturing", self.limit)
        self._programs[key] = program
        self._programs.move_to_end(key)
        while len(self._programs) > self.limit:
            old, p = self._programs.popitem(last=False)
            self.evicted += 1
            if len(self._gone) > 16 * self.limit:      # only to word a log line: kept small
                self._gone.clear()
            self._gone.add(old)
            self.on_evict(old, p)

    def __getitem__(self, key):
        return self._programs[key]

    def __contains__(self, key) -> bool:
        return key in self._programs

    def __len__(self) -> int:
        return len(self._programs)

    def items(self):
        return self._programs.items()

    def values(self):
        return self._programs.values()

    def keys(self):
        return self._programs.keys()
