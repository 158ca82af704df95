#!/usr/bin/env bash
# Talk to `blockrt serve` with curl: a completion, a streamed one (server-sent events), the model
# list, health and metrics. Start a server first, e.g.:
#   blockrt export --preset tiny_block --out artifacts/tiny
#   blockrt serve artifacts/tiny --backend torch --port 8000
# then: bash samples/curl_completions.sh [http://127.0.0.1:8000]
set -euo pipefail
url="${1:-http://127.0.0.1:8000}"

echo "# completion (greedy; the tiny artifact has no tokenizer, so the prompt is token ids)"
curl -sS "$url/v1/completions" -H 'Content-Type: application/json' \
     -d '{"prompt": [1, 2, 3, 4, 5], "max_tokens": 16, "temperature": 0}'
echo

echo "# sampled, seeded, with extensions (top_k, stop_token_ids, ignore_eos)"
curl -sS "$url/v1/completions" -H 'Content-Type: application/json' \
     -d '{"prompt": [1, 2, 3], "max_tokens": 16, "temperature": 0.8, "top_p": 0.95, "top_k": 50, "seed": 7,
          "stop_token_ids": [13], "ignore_eos": true}'
echo

echo "# streamed: one event per generated block, then data: [DONE]"
curl -sS -N "$url/v1/completions" -H 'Content-Type: application/json' \
     -d '{"prompt": [1, 2, 3], "max_tokens": 12, "temperature": 0, "stream": true,
          "stream_options": {"include_usage": true}}'

echo "# a bad request: 400 with an OpenAI error object"
curl -sS "$url/v1/completions" -H 'Content-Type: application/json' -d '{"prompt": [1], "temperature": -1}'
echo

echo "# models, health, metrics"
curl -sS "$url/v1/models"; echo
curl -sS "$url/health"; echo
curl -sS "$url/metrics" | grep -E '^blockrt_(queue_depth|running_requests|generated_tokens_total|requests_total)'
