"""What every route reads: the model served, its limits, workers and batcher, its report (paths made
relative), and how a failure is answered and logged, in charlm's error shape or OpenAI's."""
from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import Response

from charlm.api import LanguageModel
from charlm.errors import CharlmError
from charlm.serve.batching import Batcher
from charlm.serve.http import answer_of, error_answer, json_answer
from charlm.serve.limits import ServeLimits
from charlm.serve.openai import error_body
from charlm.serve.security import OPENAI_PATHS
from charlm.serve.workers import WorkerPool


@dataclass
class Served:
    """The one model behind an app, and everything its routes share (``app.state.served``)."""

    lm: LanguageModel
    limits: ServeLimits
    pool: WorkerPool
    batcher: Batcher | None
    report: dict[str, Any]  # what `charlm info --json` shows, without the machine's folders
    model_id: str  # the name OpenAI's clients ask for
    created: int  # the checkpoint's time, as OpenAI's model card gives it
    say: Callable[[str], None] = logging.getLogger(__name__).error

    def failure(self, exc: BaseException) -> Response:
        """A failure as a one-line JSON error; a bug's traceback goes to the log."""
        status, message = answer_of(exc)
        if status == 500 and not isinstance(exc, CharlmError):
            self.say("charlm: error while serving a request:\n" + "".join(traceback.format_exception(exc)).rstrip())
        return error_answer(status, message)

    def openai_failure(self, exc: BaseException) -> Response:
        """A failure in OpenAI's error shape (a bad value is its 400, BadRequestError)."""
        self.failure(exc)  # logs a bug's traceback
        status, message = answer_of(exc)
        if status == 422:
            status = 400
        param, code = getattr(exc, "param", None), getattr(exc, "code", None)
        return json_answer(error_body(status, message, param=param, code=code), status)

    def error_for(self, path: str, status: int, message: str, code: str | None = None) -> Response:
        """A refusal in the shape of the route asked for."""
        if path.startswith(OPENAI_PATHS):
            return json_answer(error_body(status, message, code=code), status)
        return error_answer(status, message)


def served_by(request: Request) -> Served:
    return request.app.state.served


def without_paths(value: Any, checkpoint: Any) -> Any:
    """``value`` with every absolute path of this machine made relative: the checkpoint as
    ``run/best.safetensors``, any other (a corpus) as its file name. A client learns nothing of
    the machine's folders."""
    if isinstance(value, dict):
        return {key: without_paths(item, checkpoint) for key, item in value.items()}
    if isinstance(value, list):
        return [without_paths(item, checkpoint) for item in value]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        path = os.path.normpath(value)
        if path == os.path.normpath(str(checkpoint)):
            return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
        return os.path.basename(path)
    return value
