"""A Hugging Face token field for the export notebook: the token reaches the caller and nothing else.

The field is a password box; it is cleared as soon as the token is taken, so a saved notebook's
widget state holds no token, and the status line only says where a token came from. When a Colab
secret or ``$HF_TOKEN`` already provides one, the widget says so and nothing needs typing.
"""

from __future__ import annotations

from collections.abc import Callable

from nbkit.export.hub import Secret, resolve_token


class HubLogin:
    """``login = HubLogin(); login`` (shows it); later ``login.token`` is a :class:`Secret` or None."""

    def __init__(self, on_token: Callable[[Secret], None] | None = None, check_existing: bool = True) -> None:
        import ipywidgets as widgets

        self._token = resolve_token() if check_existing else None
        self._on_token = on_token
        self.password = widgets.Password(placeholder="hf_...", description="HF token")
        self.button = widgets.Button(description="Use token", button_style="primary")
        self.status = widgets.HTML()
        self.button.on_click(self.submit)
        self.widget = widgets.VBox([widgets.HBox([self.password, self.button]), self.status])
        self._show()

    @property
    def token(self) -> Secret | None:
        return self._token

    def submit(self, _button=None) -> None:
        """Take the typed token (button click), clear the field and pass the token on."""
        value = self.password.value or ""
        self.password.value = ""
        if not value.strip():
            self.status.value = "Paste a token with write access (https://huggingface.co/settings/tokens) first."
            return
        self._token = Secret(value.strip(), "login widget")
        self._show()
        if self._on_token:
            self._on_token(self._token)

    def _show(self) -> None:
        if self._token is None:
            self.status.value = ("No token yet: paste one with write access, or add the Colab secret HF_TOKEN "
                                 "(key icon in the left bar) and run the cell again.")
        else:
            self.status.value = f"Token ready ({self._token.source}); it is never shown or saved."

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
