/**
 * `qwen-token login`: the daemon runs the device flow; this command shows the URL, the user
 * code and a QR code, waits with a countdown, and cancels the flow in the daemon on Ctrl-C.
 */
import { Command } from 'commander';
import type { Spinner } from 'nanospinner';
import { QwenError } from '../../shared/errors.js';
import type { LoginStartResult } from '../../shared/protocol.js';
import { isOpenableUrl, printable } from '../../shared/url-trust.js';
import type { TokenClient } from '../token-client.js';
import { commandEnv, interactive, note, openClient, out, outJson, profileOption, type GlobalOptions } from './context.js';
import { describeExpiry, formatDuration } from './duration.js';
import { CommandExit, ExitCodes } from './exit-codes.js';
import { delay, keepAlive } from './keep-alive.js';
import { errorText } from '../../shared/diagnostics.js';

export interface LoginCommandOptions {
  browser: boolean;
  json?: boolean;
  /** The profile to log in (default: the client's, i.e. `QWEN_TOKEND_PROFILE`, else the daemon's default). */
  profile?: string;
}

/** How long to wait for the daemon to confirm a cancelled login before exiting anyway. */
const CANCEL_CONFIRM_MS = 3_000;

type Outcome = { kind: 'completed'; expiry_date: number } | { kind: 'failed'; error: unknown };

function settle(p: Promise<{ expiry_date: number }>): Promise<Outcome> {
  return p.then(
    (v) => ({ kind: 'completed', expiry_date: v.expiry_date }),
    (error: unknown) => ({ kind: 'failed', error }),
  );
}

/** The terminal libraries human mode needs, loaded only then. */
interface TerminalKit {
  createSpinner: typeof import('nanospinner').createSpinner;
  qrcode: typeof import('qrcode-terminal');
}

async function loadTerminalKit(): Promise<TerminalKit> {
  const [{ createSpinner }, { default: qrcode }] = await Promise.all([import('nanospinner'), import('qrcode-terminal')]);
  return { createSpinner, qrcode };
}

/** The QR code of `text` in the terminal's half-block characters. */
function qrText(kit: TerminalKit, text: string): string {
  let result = '';
  kit.qrcode.generate(text, { small: true }, (q) => {
    result = q;
  });
  return result;
}

async function openBrowser(url: string): Promise<void> {
  try {
    const { default: open } = await import('open');
    const child = await open(url);
    child.on('error', () => undefined);
  } catch (err) {
    note(`(could not open a browser: ${errorText(err)}; open the URL yourself)`);
  }
}

/** Shows the code and waits; the terminal part of the login. */
class LoginView {
  private spinner: Spinner | null = null;
  private ticker: NodeJS.Timeout | null = null;
  private expiresAt = 0;

  /** `kit` is null in JSON mode. */
  constructor(
    private readonly kit: TerminalKit | null,
    private readonly browser: boolean,
    /** Named in the instructions unless it is the built-in Qwen profile (or not known). */
    private readonly profile: string | undefined,
  ) {}

  private get json(): boolean {
    return this.kit === null;
  }

  showCode(raw: LoginStartResult): void {
    // Server text reaches the terminal: no control characters (escape sequences could rewrite
    // the screen, retitle the window or hide what is shown), whatever the server sent.
    const info: LoginStartResult = {
      ...raw,
      user_code: printable(raw.user_code, 100),
      verification_uri: printable(raw.verification_uri, 1000),
      verification_uri_complete: raw.verification_uri_complete === undefined ? undefined : printable(raw.verification_uri_complete, 1000),
    };
    this.expiresAt = Date.now() + info.expires_in * 1000;
    const url = info.verification_uri_complete ?? info.verification_uri;
    const kit = this.kit;
    if (kit === null) {
      outJson({
        event: 'login.code',
        user_code: info.user_code,
        verification_uri: info.verification_uri,
        ...(info.verification_uri_complete === undefined ? {} : { verification_uri_complete: info.verification_uri_complete }),
        expires_in: info.expires_in,
        expires_at: this.expiresAt,
      });
      return;
    }
    const to = this.profile === undefined || this.profile === 'qwen' ? 'to Qwen' : `(profile ${this.profile})`;
    out(`To log in ${to}, open this URL and confirm the code:\n\n  ${url}\n\n  Code: ${info.user_code}\n\n`);
    out(`${qrText(kit, url)}\n`);
    // A browser only makes sense for a person at this terminal, and only for a web address:
    // https, or http on this machine (never file:, javascript: or a custom scheme's handler).
    if (this.browser && interactive()) {
      if (isOpenableUrl(url)) void openBrowser(url);
      else note('(not opening this URL in a browser: it is not an https address; check it before opening it yourself)');
    }
    // nanospinner divides by the terminal width: a pty without a size (columns 0) would spin forever.
    if (interactive() && process.stderr.isTTY && (process.stderr.columns ?? 0) > 0) {
      // Driven by hand: nanospinner's start() installs a SIGINT handler that exits at once,
      // which would leave the flow running in the daemon.
      this.spinner = kit.createSpinner(this.waitingText(), { stream: process.stderr });
      this.spinner.spin();
      this.ticker = setInterval(() => this.spinner?.update({ text: this.waitingText() }).spin(), 100);
    } else {
      note(`Waiting for approval (the code ${describeExpiry(this.expiresAt, Date.now())}; Ctrl-C cancels)...`);
    }
  }

  private waitingText(): string {
    const left = this.expiresAt - Date.now();
    return left > 0 ? `Waiting for approval... code expires in ${formatDuration(left)} (Ctrl-C cancels)` : 'Waiting for approval... the code has expired';
  }

  completed(expiry: number, tokenFingerprint: string | undefined): void {
    if (this.json) {
      outJson({ event: 'login.completed', expiry_date: expiry, ...(tokenFingerprint ? { token_fingerprint: tokenFingerprint } : {}) });
      return;
    }
    const text = `Logged in. The token ${describeExpiry(expiry, Date.now())}${tokenFingerprint ? ` (fingerprint ${tokenFingerprint})` : ''}.`;
    if (this.stopSpinner()) this.spinner!.success(text);
    else out(`${text}\n`);
  }

  failed(error: unknown): void {
    if (this.json) {
      outJson({
        event: 'login.failed',
        code: error instanceof QwenError ? error.code : 'QWEN_ERROR',
        message: errorText(error),
      });
      return;
    }
    if (this.stopSpinner()) this.spinner!.error('Login failed.');
  }

  cancelled(confirmed: boolean): void {
    const text = confirmed ? 'Login cancelled.' : 'Login cancelled here; the daemon did not confirm in time.';
    if (this.json) outJson({ event: 'login.cancelled', confirmed });
    else if (this.stopSpinner()) this.spinner!.warn(text);
    else note(text);
  }

  /** Stops the countdown; true when a spinner is on screen to finish with a mark. */
  stopSpinner(): boolean {
    if (this.ticker) clearInterval(this.ticker);
    this.ticker = null;
    return this.spinner !== null;
  }

  /** Puts the terminal back (cursor visible) before an abrupt exit. */
  restoreTerminal(): void {
    if (this.stopSpinner()) this.spinner!.stop();
  }
}

/** Runs the login through `client`; throws the failure, or `CommandExit` (130) when cancelled. */
export async function runLogin(client: TokenClient, options: LoginCommandOptions): Promise<void> {
  const profile = options.profile ?? client.profile;
  const view = new LoginView(options.json ? null : await loadTerminalKit(), options.browser, profile);
  const abort = new AbortController();
  let interrupted!: () => void;
  const interruption = new Promise<'interrupted'>((done) => {
    interrupted = () => done('interrupted');
  });
  let codeShown = false;
  const onSigint = () => {
    if (abort.signal.aborted) {
      // Second Ctrl-C: stop waiting for the daemon's confirmation.
      view.restoreTerminal();
      process.exit(ExitCodes.cancelled);
    }
    // TokenClient sends login.cancel now, or right after login.start answers.
    abort.abort();
    interrupted();
  };
  const release = keepAlive();
  process.on('SIGINT', onSigint);
  try {
    const login = client.login({
      ...(options.profile === undefined ? {} : { profile: options.profile }),
      signal: abort.signal,
      onCode: (info) => {
        if (abort.signal.aborted) return;
        codeShown = true;
        view.showCode(info);
      },
    });
    const outcome = settle(login);
    let result = await Promise.race([outcome, interruption]);
    if (result === 'interrupted') {
      // The daemon answers a cancelled flow with login.failed; wait for it so that, once we
      // exit, the daemon's status no longer shows a login in progress.
      const confirmed = await Promise.race([outcome, delay(CANCEL_CONFIRM_MS).then(() => null)]);
      if (confirmed === null || confirmed.kind === 'failed') {
        if (codeShown || options.json) view.cancelled(confirmed !== null);
        else note('Login cancelled.');
        throw new CommandExit(ExitCodes.cancelled);
      }
      // Approved just before the cancel arrived: the login did happen, so say so.
      result = confirmed;
    }
    if (result.kind === 'failed') {
      view.failed(result.error);
      throw result.error;
    }
    const status = await client.status(options.profile === undefined ? {} : { profile: options.profile }).catch(() => null);
    view.completed(result.expiry_date, status?.token_fingerprint);
  } finally {
    process.off('SIGINT', onSigint);
    view.stopSpinner();
    release();
  }
}

/** The `login` command. */
export function loginCommand(): Command {
  const cmd = new Command('login')
    .description("log in with a profile's device flow (Qwen's by default; run by the daemon): shows a URL, a code and a QR code")
    .option('--no-browser', 'do not try to open the URL in a browser')
    .option('--json', 'print JSON lines: the code first, then the result');
  return profileOption(cmd, 'the profile to log in')
    .action(async (opts: LoginCommandOptions, cmd: Command) => {
      const env = commandEnv(cmd.optsWithGlobals<GlobalOptions>());
      const client = await openClient(env);
      try {
        await runLogin(client, opts);
      } finally {
        await client.close();
      }
    });
}
