// Login, team sign-up and joining by invitation (#/join/<token>: the token stays in the fragment, which is
// never sent to the server nor written to its logs).
import { ApiError, api } from "../api.js";
import { fill, formValues, h } from "../dom.js";

function field(label, name, attrs = {}) {
  const id = `f-${name}`;
  return h("div", { class: "field" }, h("label", { for: id }, label), h("input", { id, name, ...attrs }));
}

function errorLine() {
  return h("p", { class: "error", role: "alert", hidden: true });
}

function showError(line, err) {
  line.textContent = err instanceof ApiError ? err.message : "The server could not be reached.";
  if (err instanceof ApiError && err.status === 429 && err.retryAfter) line.textContent += ` (retry in ${err.retryAfter} s)`;
  line.hidden = false;
}

/** A form that disables its button while `action(values)` runs and shows what went wrong. */
function authForm(title, fields, submitText, action, footer) {
  const error = errorLine();
  const button = h("button", { type: "submit" }, submitText);
  const form = h(
    "form",
    {
      class: "card auth",
      onsubmit: async (event) => {
        event.preventDefault();
        error.hidden = true;
        button.disabled = true;
        try {
          await action(formValues(form));
        } catch (err) {
          showError(error, err);
        } finally {
          button.disabled = false;
          // Disabled while it ran, the button dropped the focus (pressed from the keyboard): a refusal leaves the
          // form shown, and the focus goes back on its button, by the message, not to the page's start.
          if (form.isConnected && (!document.activeElement || document.activeElement === document.body)) button.focus();
        }
      },
    },
    h("h1", {}, title),
    fields,
    error,
    button,
    footer,
  );
  return form;
}

async function login(values, signedIn) {
  const body = { email: values.email, password: values.password };
  if (values.team_id) body.team_id = values.team_id;
  await api("/api/auth/login", { method: "POST", body });
  await signedIn();
}

/**
 * An email and password that match accounts in several teams get a 401 listing them (`teams`): the form then
 * offers them by name, and the next login sends the chosen `team_id`.
 */
function loginPage({ signedIn }) {
  const email = field("Email", "email", { type: "email", autocomplete: "username", required: true, autofocus: true });
  const teams = h("div", { class: "field", hidden: true });
  // Another email: the teams offered were the previous one's.
  email.querySelector("input").addEventListener("input", () => {
    fill(teams);
    teams.hidden = true;
  });
  return authForm(
    "Log in",
    [email, field("Password", "password", { type: "password", autocomplete: "current-password", required: true }), teams],
    "Log in",
    async (values) => {
      try {
        await login(values, signedIn);
      } catch (err) {
        const choices = err instanceof ApiError && err.status === 401 && !values.team_id ? err.body?.teams : null;
        if (!choices?.length) throw err;
        fill(
          teams,
          h("label", { for: "f-team_id" }, "Team"),
          h("select", { id: "f-team_id", name: "team_id", required: true }, choices.map((team) => h("option", { value: team.id }, team.name))),
        );
        teams.hidden = false;
        teams.querySelector("select").focus();
        throw new ApiError(401, "Your email is in several teams: choose one, then log in.");
      }
    },
    h("p", { class: "muted" }, "New team? ", h("a", { href: "#/signup" }, "Create one")),
  );
}

function signupPage({ signedIn }) {
  return authForm(
    "Create a team",
    [
      field("Team name", "name", { required: true, maxlength: 100, autofocus: true }),
      field("Your name", "admin_full_name", { autocomplete: "name", maxlength: 200 }),
      field("Email", "admin_email", { type: "email", autocomplete: "username", required: true }),
      field("Password (8 characters or more)", "admin_password", {
        type: "password",
        autocomplete: "new-password",
        minlength: 8,
        required: true,
      }),
    ],
    "Create team",
    async (values) => {
      const { team } = await api("/api/teams", { method: "POST", body: values });
      await login({ email: values.admin_email, password: values.admin_password, team_id: team.id }, signedIn);
    },
    h("p", { class: "muted" }, "Already have an account? ", h("a", { href: "#/login" }, "Log in")),
  );
}

function joinPage(token, { signedIn }) {
  const about = h("p", { class: "muted" }, "Checking the invitation…");
  const email = field("Email", "email", { type: "email", autocomplete: "username", required: true });
  const form = authForm(
    "Join a team",
    [
      about,
      // The page's first field takes the focus, as on the login and sign-up pages.
      field("Your name", "full_name", { autocomplete: "name", maxlength: 200, autofocus: true }),
      email,
      field("Password (8 characters or more)", "password", {
        type: "password",
        autocomplete: "new-password",
        minlength: 8,
        required: true,
      }),
    ],
    "Join",
    async (values) => {
      const user = await api("/api/auth/register", { method: "POST", body: { invite_token: token, ...values } });
      await login({ email: values.email, password: values.password, team_id: user.team_id }, signedIn);
    },
    h("p", { class: "muted" }, h("a", { href: "#/login" }, "Log in instead")),
  );
  api(`/api/invites/${encodeURIComponent(token)}`)
    .then((invite) => {
      about.textContent = `You are invited to ${invite.team_name} as ${invite.role}.`;
      if (invite.email) {
        const input = email.querySelector("input");
        input.value = invite.email;
        input.readOnly = true;
      }
    })
    .catch(() => {
      about.textContent = "This invitation is unknown, used up, expired or revoked.";
      about.className = "error";
      form.querySelector("button[type=submit]").disabled = true;
    });
  return form;
}

export function renderAuth(section, token, ctx) {
  const page = section === "signup" ? signupPage(ctx) : section === "join" ? joinPage(token, ctx) : loginPage(ctx);
  return h("main", { id: "main", class: "center" }, page);
}
