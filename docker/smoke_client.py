"""The smoke test's client: waits for GET /health, then, through the official
openai SDK (greedy, so each answer is deterministic): a wrong key gets 401;
the same question without and with a preference gives two well-formed,
different answers; streaming gives the same answer; a preference stored for
a user (PUT /v1/users/{user}/preferences, the database) gives it too.

    python docker/smoke_client.py BASE_URL API_KEY [--wait SECONDS] [--label NAME]

Exit 0 and one summary line when every check passes."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

from openai import OpenAI

QUESTION = "How do I sleep better?"
PREFERENCE = "Answer like a pirate, with lots of humour"
USER = "smoke-user"


def wait_healthy(base_url: str, seconds: float) -> float:
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() - start < seconds:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - start
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(2)
    raise SystemExit(f"FAIL: {base_url}/health not 200 after {seconds:.0f}s (last: {last})")


def ask(client: OpenAI, model: str, preference: str | None) -> tuple[str, str]:
    extra = {"preference": preference} if preference else None
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=40,
        temperature=0,
        extra_body=extra,
    )
    assert response.object == "chat.completion", response.object
    choice = response.choices[0]
    assert choice.message.role == "assistant", choice.message.role
    assert choice.finish_reason in ("stop", "length"), choice.finish_reason
    text = choice.message.content or ""
    assert text.strip(), "empty answer"
    assert response.usage and response.usage.completion_tokens > 0, response.usage
    return text, choice.finish_reason


def ask_stream(client: OpenAI, model: str, preference: str) -> str:
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=40,
        temperature=0,
        stream=True,
        extra_body={"preference": preference},
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("base_url")
    parser.add_argument("api_key")
    parser.add_argument("--wait", type=float, default=600)
    parser.add_argument("--label", default="smoke")
    args = parser.parse_args()
    base = args.base_url.rstrip("/")
    waited = wait_healthy(base, args.wait)

    client = OpenAI(base_url=f"{base}/v1", api_key=args.api_key, max_retries=0, timeout=300)
    # A wrong key must be refused: the key reached the container.
    try:
        OpenAI(base_url=f"{base}/v1", api_key="wrong-key", max_retries=0).models.list()
        raise SystemExit("FAIL: a wrong API key was accepted")
    except Exception as exc:  # openai.AuthenticationError
        if getattr(exc, "status_code", None) != 401:
            raise
    model = client.models.list().data[0].id
    plain, _ = ask(client, model, None)
    steered, reason = ask(client, model, PREFERENCE)
    if steered == plain:
        raise SystemExit(f"FAIL: the preference changed nothing: {steered!r}")
    # Greedy: the stream carries the same answer.
    streamed = ask_stream(client, model, PREFERENCE)
    if streamed != steered:
        raise SystemExit(f"FAIL: streamed {streamed!r} != non-streamed {steered!r}")
    # A preference stored for a user (the database) steers that user's requests.
    client.put(f"/users/{USER}/preferences", cast_to=object, body={"preferences": [PREFERENCE]})
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=40, temperature=0, user=USER
    )
    remembered = response.choices[0].message.content
    if remembered != steered:
        raise SystemExit(f"FAIL: the stored preference gave {remembered!r}, the request's {steered!r}")
    client.delete(f"/users/{USER}/preferences", cast_to=object)
    print(
        f"{args.label}: healthy after {waited:.0f}s; model {model}; "
        f"plain: {json.dumps(plain[:60])}; "
        f"with preference: {json.dumps(steered[:60])} (finish {reason}); "
        "streamed and stored-preference answers identical"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
