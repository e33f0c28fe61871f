"""Drives primad with the official OpenAI Python client.

usage: openai_client.py BASE_URL MODEL QUESTION MAX_TOKENS RAW_PROMPT
Prints one JSON object with what each call returned; exits non-zero when the
client raised where it should not have.
"""
import json
import sys

import openai
from openai import OpenAI

base, model, question, max_tokens, raw = sys.argv[1:6]
max_tokens = int(max_tokens)
client = OpenAI(base_url=base + "/v1", api_key="not-needed-on-loopback", max_retries=0)

out = {"models": [m.id for m in client.models.list()]}

r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": question}],
    temperature=0,
    max_tokens=max_tokens,
)
out["chat"] = r.choices[0].message.content
out["chat_finish"] = r.choices[0].finish_reason
out["chat_usage"] = r.usage.model_dump()

pieces, usage, finish = [], None, None
for chunk in client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": question}],
    temperature=0,
    max_tokens=max_tokens,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    if chunk.choices:
        if chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
out["stream"] = "".join(pieces)
out["stream_chunks"] = len(pieces)
out["stream_finish"] = finish
out["stream_usage"] = usage

c = client.completions.create(model=model, prompt=raw, temperature=0, max_tokens=max_tokens)
out["completion"] = c.choices[0].text

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    out["unknown_model"] = "no error"
except openai.NotFoundError as e:
    out["unknown_model"] = e.message

print(json.dumps(out))
