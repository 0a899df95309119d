"""The pure observation core: leaves, conversations, counters and the events they yield."""
