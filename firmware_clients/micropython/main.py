"""Board entry point: edit the settings, copy the firmware_clients/micropython files to the board.

Needs umqtt.simple (``mip.install("umqtt.simple")``) and a network connection
(e.g. ``network.WLAN(network.STA_IF)`` connected in boot.py).
"""

from fbclient import Client, load_csv

BROKER = "192.168.1.10"
PORT = 1883
NODE_ID = "fw-mp-0"
NAMESPACE = "digits"  # the topology name
MAX_PAYLOAD_BYTES = 4096  # the broker's max_payload_bytes

x, y, features = load_csv("data.csv")
Client(NODE_ID, NAMESPACE, x, y, features, BROKER, PORT, max_payload_bytes=MAX_PAYLOAD_BYTES).run()
