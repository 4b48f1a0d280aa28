"""The smoke test's client: waits for GET /health, then asks the same
question through the official openai SDK without and with a preference
(greedy, so each answer is deterministic) and checks both answers.

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
PREFERENCE = "I want the answer in one short sentence, written entirely in capital letters."


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
    letters = [c for c in steered if c.isalpha()]
    upper = sum(c.isupper() for c in letters) / max(1, len(letters))
    plain_letters = [c for c in plain if c.isalpha()]
    plain_upper = sum(c.isupper() for c in plain_letters) / max(1, len(plain_letters))
    if steered == plain:
        raise SystemExit(f"FAIL: the preference changed nothing: {steered!r}")
    print(
        f"{args.label}: healthy after {waited:.0f}s; model {model}; "
        f"plain: {json.dumps(plain[:70])}; "
        f"with preference: {json.dumps(steered[:70])} (finish {reason}; "
        f"upper-case letters {upper:.0%} vs {plain_upper:.0%} plain)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
