"""`imgclf review`: work through suspected label errors in the browser and record corrections.

    session.py   the queues of a run or cross-validation, and the decisions (corrections.csv)
    server.py    the page and its JSON API (FastAPI + uvicorn)
    page.html    the page: plain HTML and JavaScript, keyboard first, nothing loaded from elsewhere

`imgclf train --corrections RUN/corrections.csv` applies the decisions (imgclf.data.corrections).
"""

from imgclf.commands.review.session import QUEUES, ReviewSession

__all__ = ["ReviewSession", "QUEUES", "create_app", "run_review"]


def __getattr__(name: str):
    # lazy: the server needs FastAPI (the `serve` extra); the session does not.
    if name in ("create_app", "run_review"):
        from imgclf.commands.review import server  # lazy: FastAPI

        return getattr(server, name)
    raise AttributeError(f"module 'imgclf.commands.review' has no attribute {name!r}")
