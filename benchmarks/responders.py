"""The two reference responders the agent is measured against, each run as its own process.

``python -m benchmarks.responders echo --port P --device D``: the ceiling. Every request is published back
unchanged on the requester's reply topic (no parsing, no inference): the most any responder can do over
this broker and harness.

``python -m benchmarks.responders baseline --port P --device D --model FILE``: what a user would write
instead of the agent. A plain paho ``on_message`` parses the JSON, runs a LiteRT interpreter and publishes
the answer: no validation, no bounded queue, no ordered acknowledgements, no durability, no signature.

Both subscribe at QoS 1, publish at QoS 1, set TCP_NODELAY, print ``ready`` once subscribed, and run
until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from agent.mqtt import topics
from agent.mqtt.transport import new_client

Handler = Callable[[mqtt.Client, mqtt.MQTTMessage], None]


def echo_handler(device: str) -> Handler:
    def on_request(client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        client_id = message.topic.rsplit("/", 1)[-1]
        client.publish(topics.reply_topic(device, client_id), message.payload, qos=1)

    return on_request


def baseline_handler(device: str, model_path: str, labels: list[str], num_threads: int) -> Handler:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=model_path, num_threads=num_threads)
    interpreter.allocate_tensors()
    input_detail = interpreter.get_input_details()[0]
    output_index = interpreter.get_output_details()[0]["index"]

    def on_request(client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        request = json.loads(message.payload)
        value = next(iter(request["params"]["inputs"].values()))
        interpreter.set_tensor(input_detail["index"], np.asarray(value, dtype=input_detail["dtype"]))
        interpreter.invoke()
        scores = interpreter.get_tensor(output_index)[0]
        result: dict[str, Any] = {"probabilities": scores.tolist()}
        if labels:
            result["label"] = labels[int(scores.argmax())]
        reply = {"jsonrpc": "2.0", "id": request["id"], "result": result}
        client_id = message.topic.rsplit("/", 1)[-1]
        client.publish(topics.reply_topic(device, client_id), json.dumps(reply), qos=1)

    return on_request


def serve(host: str, port: int, device: str, handler: Handler) -> None:
    """Subscribe to the device's request topics and answer each request with ``handler`` until SIGTERM."""
    stop = threading.Event()
    subscribed = threading.Event()
    client = new_client(f"responder-{device}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.on_connect = lambda c, u, f, r, p: c.subscribe(topics.request_filter(device), qos=1)
    client.on_subscribe = lambda *args: subscribed.set()
    client.on_message = lambda c, userdata, message: handler(c, message)
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    client.connect(host, port, keepalive=60)
    client.loop_start()
    if not subscribed.wait(10):
        raise SystemExit(f"responder: could not subscribe on {host}:{port}")
    print("ready", flush=True)
    while not stop.wait(0.5):
        pass
    client.disconnect()
    client.loop_stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.responders", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("echo", "baseline"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--model", help="baseline: the .tflite file")
    parser.add_argument("--labels", default="", help="baseline: comma-separated labels in output order")
    parser.add_argument("--num-threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.kind == "echo":
        handler = echo_handler(args.device)
    else:
        if not args.model:
            parser.error("baseline needs --model")
        labels = [label for label in args.labels.split(",") if label]
        handler = baseline_handler(args.device, args.model, labels, args.num_threads)
    serve(args.host, args.port, args.device, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
