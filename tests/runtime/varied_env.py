"""A test environment whose rewards vary with the model's messages (a random model never uses a real tool)."""


class Varied:
    def reset(self, row):
        self.turn = 0
        return "ask:" if len(row["prompt"]) % 2 else None

    def step(self, message):
        self.turn += 1
        done = any(c.isdigit() for c in message)
        return f"#{len(message)}\n", (len(message) % 3) / 2, done
