"""``qpeft chat``: talk to a finished run's model in a terminal — the conversation kept and
rendered with the run's template (the model's chat template), the answer streamed token by
token as it is generated."""
import click

from qpeft.core.cli.generate_cmd import load, prompt_ids, target_options

HELP_LINE = "/reset starts a new conversation, /quit (or Ctrl-D) leaves; Ctrl-C stops an answer"


@click.command("chat")
@target_options
@click.option("--system", default=None, help="a system message opening the conversation")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="tokens generated per answer at most")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy, as the evaluators generate; above 0: sampled")
@click.option("--seed", type=int, default=0, show_default=True, help="random seed (for sampling)")
def chat_command(directory, no_adapter, device, rank, system, max_new_tokens, temperature, seed, **base):
    """Talk to DIR's model: a run directory, or an adapter directory over --model/--quant.

    Each line you type is a user turn; the model answers greedily (by default) from the
    whole conversation rendered with the run's template, and its answer appears as it is
    generated. /reset starts a new conversation, /quit or Ctrl-D leaves, Ctrl-C stops an
    answer (and leaves when pressed at the prompt).

    \b
    Examples:
      qpeft chat runs/nf4-lora
      qpeft chat runs/nf4-lora --no-adapter                  # the quantized base
      qpeft chat ./peft-lora --model ./base-model --quant nf4
    """
    import torch

    built, template, device = load(directory, no_adapter, device, rank,
                                   say=lambda line: click.echo(line, err=True), **base)
    torch.manual_seed(seed)
    talk = Conversation(built.model, built.tokenizer, template, device, system, max_new_tokens, temperature)
    click.echo(f"qpeft: chatting with {built.run_dir.name}{' (no adapter)' if no_adapter else ''}; {HELP_LINE}",
               err=True)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit", "/q"):
            return
        if line == "/reset":
            talk.reset()
            click.echo("(new conversation)")
            continue
        if line.startswith("/") and " " not in line:
            click.echo(f"(unknown command {line}; {HELP_LINE})")
            continue
        talk.answer(line)


class Conversation:
    """The messages so far, and one streamed answer at a time."""

    def __init__(self, model, tokenizer, template, device, system, max_new_tokens, temperature):
        self.model, self.tokenizer, self.template, self.device = model, tokenizer, template, device
        self.system, self.max_new_tokens, self.temperature = system, max_new_tokens, temperature
        self.context = getattr(model.config, "max_position_embeddings", None) or 2048
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def answer(self, text: str) -> str:
        """Stream the model's answer to ``text`` to stdout and keep both turns; Ctrl-C stops
        the answer, and the turn is then forgotten."""
        import torch
        from transformers import TextStreamer

        turns = self.messages + [{"role": "user", "content": text}]
        ids = self._fitting(turns)
        if ids is None:
            click.echo(f"(this message alone does not fit the model's {self.context} tokens; /reset or shorten it)")
            return ""
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": 1.0, "top_k": 0} \
            if self.temperature > 0 else {"do_sample": False}
        try:
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=torch.tensor([ids], device=self.device),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
                    max_new_tokens=min(self.max_new_tokens, self.context - len(ids)),
                    pad_token_id=self.tokenizer.pad_token_id, streamer=streamer, **sampling)
        except KeyboardInterrupt:
            click.echo("\n(answer stopped; this turn is forgotten)")
            return ""
        reply = self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        self.messages = turns + [{"role": "assistant", "content": reply.strip()}]
        return reply

    def _fitting(self, turns: list):
        """The prompt ids of ``turns``, the oldest exchanges dropped while it leaves no room
        to answer (None when even the last message alone does not fit)."""
        opening = 1 if turns and turns[0]["role"] == "system" else 0
        while True:
            ids = prompt_ids(turns, self.tokenizer, self.template)
            if len(ids) < self.context - 16:
                return ids
            if len(turns) - opening <= 1:
                return None
            turns[opening:opening + 2] = []      # the oldest user turn and its answer
            self.messages = turns[:-1]
            click.echo("(the oldest exchange was dropped to fit the model's context)", err=True)
