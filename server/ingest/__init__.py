"""Where the fleet's messages come in: the gRPC FleetService, the MQTT bridge (and the embedded broker), and the
checks every device event and telemetry window passes before it is stored."""
