"""The official `openai` client against a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

API_KEY, ADMIN_KEY = "test-key", "admin-key"


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0)


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def admin(live) -> dict:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_models_lists_the_quantization(client):
    (model,) = client.models.list().data
    assert model.id == "tiny"
    assert model.veq["bits"] == 4 and model.veq["method"] == "rtn"
    assert model.veq["weight_bytes"] > 0


def test_chat_with_an_image(client, png):
    text_only = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "What colour?"}],
        max_tokens=4,
        temperature=0,
    )
    r = client.chat.completions.create(
        model="tiny",
        messages=[
            {
                "role": "user",
                "content": [
                    image_part(png((200, 30, 30), size=128)),
                    {"type": "text", "text": "What colour?"},
                ],
            }
        ],
        max_tokens=6,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 6
    # A 128×128 image is 8×8 patches of 16 px, merged 2×2: 16 tokens, plus start/end markers.
    assert r.usage.prompt_tokens == text_only.usage.prompt_tokens + 16 + 2
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_greedy_is_deterministic_and_seed_repeats(client, png):
    msgs = [{"role": "user", "content": [image_part(png(seed=3)), {"type": "text", "text": "Hi"}]}]
    a = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    b = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    s1 = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, seed=7)
    s2 = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, seed=7)
    assert s1.choices[0].message.content == s2.choices[0].message.content


def test_streaming_matches_non_streaming(client, png):
    msgs = [
        {"role": "user", "content": [image_part(png((0, 0, 200))), {"type": "text", "text": "?"}]}
    ]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=msgs,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert text == full.choices[0].message.content
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage == full.usage


def test_multi_turn_and_two_images(client, png):
    r = client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "system", "content": "Answer in one word."},
            {
                "role": "user",
                "content": [image_part(png((10, 200, 10))), {"type": "text", "text": "Colour?"}],
            },
            {"role": "assistant", "content": "green"},
            {
                "role": "user",
                "content": [
                    image_part(png((200, 200, 10))),
                    image_part(png(seed=1)),
                    {"type": "text", "text": "And these two?"},
                ],
            },
        ],
        max_tokens=4,
    )
    assert r.usage.prompt_tokens > 3 * 16
    assert r.choices[0].finish_reason in ("stop", "length")


def test_stop_string_and_length(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "go"}], max_tokens=3, temperature=0
    )
    assert r.choices[0].finish_reason == "length" or r.usage.completion_tokens < 3
    text = r.choices[0].message.content
    if len(text) >= 2:
        stop = text[1:]
        stopped = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "go"}],
            max_tokens=3,
            temperature=0,
            stop=[stop],
        )
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].message.content == text[: text.find(stop)]


def test_fixed_length_extensions(client):
    """vLLM's `ignore_eos` and `min_tokens` through the client's extra_body: exactly max_tokens
    tokens; min_tokens above the limit is a 400 naming the field."""
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "go"}],
        max_tokens=7,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "go"}],
            max_tokens=2,
            extra_body={"min_tokens": 3},
        )
    assert err.value.body["param"] == "min_tokens"


def test_concurrent_requests_share_a_batch(live, png):
    async def run():
        ac = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0)
        msgs = [
            {"role": "user", "content": [image_part(png(seed=5)), {"type": "text", "text": "x"}]}
        ]
        return await asyncio.gather(
            *[
                ac.chat.completions.create(
                    model="tiny", messages=msgs, max_tokens=24, temperature=0.7
                )
                for _ in range(8)
            ]
        )

    before = httpx.get(f"{live.url}/admin/stats", headers=admin(live)).json()["engine"]["steps"]
    results = asyncio.run(run())
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in results)
    stats = httpx.get(f"{live.url}/admin/stats", headers=admin(live)).json()["engine"]
    assert stats["max_batch_seen"] >= 4  # rows decoded together, not one request at a time
    assert stats["steps"] > before


def test_metrics_exposed(live, client):
    client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "m"}], max_tokens=2
    )
    text = httpx.get(f"{live.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for name in (
        "veq_requests_total",
        "veq_time_to_first_token_seconds",
        "veq_batch_size",
        "veq_queue_depth",
        "veq_weight_bytes",
        "veq_memory_bytes",
        "veq_inter_token_latency_seconds",
        "veq_completion_tokens_total",
    ):
        assert name in text, name


def test_the_processor_runs_off_the_event_loop(live, client, png, monkeypatch):
    """Image preprocessing runs on the preprocessing thread, so a large image does not stall
    the event loop that every other connection waits on."""
    import threading

    from server.serving.chat import ChatService

    seen: list[str] = []
    real = ChatService._encode

    def spy(self, messages, images):
        seen.append(threading.current_thread().name)
        return real(self, messages, images)

    monkeypatch.setattr(ChatService, "_encode", spy)
    content = [
        {"type": "image_url", "image_url": {"url": png(size=300)}},
        {"type": "text", "text": "hi"},
    ]
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], max_tokens=2
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    assert seen and all(name.startswith("veq-preprocess") for name in seen), seen


def test_a_full_preprocessing_queue_is_503(server_factory, monkeypatch):
    """Requests waiting for the preprocessing thread count against --max-queue too."""
    import threading

    from server.serving.chat import ChatService

    release = threading.Event()
    entered = threading.Event()
    real = ChatService._encode

    def slow(self, messages, images):
        entered.set()
        release.wait(30)
        return real(self, messages, images)

    monkeypatch.setattr(ChatService, "_encode", slow)
    live = server_factory(max_queue=1)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    headers = {"Authorization": "Bearer test-key"}
    results: list[int] = []
    first = threading.Thread(
        target=lambda: results.append(
            httpx.post(
                f"{live.url}/v1/chat/completions", json=body, headers=headers, timeout=60
            ).status_code
        )
    )
    first.start()
    assert entered.wait(30)
    r = httpx.post(f"{live.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 503 and "retry-after" in r.headers
    release.set()
    first.join(60)
    assert results == [200]
