"""What coordinator and nodes agree on: the shape of a round's messages (see round.py)."""
