"""Edge mode: the hub transport's pure parts, and the real azure-iot-device SDK against the hub emulator."""
