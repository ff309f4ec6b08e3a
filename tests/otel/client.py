"""A legacy job instrumented with the OpenTelemetry Python SDK, for
tests/it/traces.rs: it makes a client span, calls URL through the proxy
with the span's W3C traceparent (injected by the SDK's propagator) and
its legacy key, and prints the span's ids and the answer's status as
JSON. Usage: client.py URL KEY
"""

import json
import sys

import requests
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider

URL, KEY = sys.argv[1], sys.argv[2]

trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("legacy-job")
with tracer.start_as_current_span("nightly invoice export", kind=trace.SpanKind.CLIENT) as span:
    headers = {"X-COUPA-API-KEY": KEY, "Accept": "application/json"}
    propagate.inject(headers)
    answer = requests.get(URL, headers=headers, timeout=30)
    context = span.get_span_context()
    print(json.dumps({
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
        "status": answer.status_code,
        "traceparent": headers.get("traceparent"),
    }))
