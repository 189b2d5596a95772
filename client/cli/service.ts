/**
 * `qwen-token service install|uninstall|status`: runs the daemon under the platform's service
 * manager, a systemd user unit on Linux or a launchd agent on macOS. While the unit/plist is
 * installed, clients do not autostart a daemon (client/autostart.ts): the service manager is
 * the one owner of starting it.
 *
 * The service managers are run as `systemctl` / `launchctl` looked up on PATH, so tests can put
 * recording stand-ins first on PATH.
 */
import { execFile } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { chmod, mkdir, rename, rm, writeFile } from 'node:fs/promises';
import { userInfo } from 'node:os';
import { dirname, isAbsolute, join, relative, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Command, Option } from 'commander';
import { expandHome, resolveConfig, type TokendConfig } from '../../shared/config.js';
import { errorText } from '../../shared/diagnostics.js';
import { packagedDaemonBin, packageRoot } from '../../shared/package.js';
import { DAEMON_GLIBC_TUNABLES, DAEMON_NODE_FLAGS, SERVICE_LABEL, SYSTEMD_UNIT, serviceFilePath } from '../autostart.js';
import { commandEnv, type GlobalOptions } from './context.js';
import { CommandExit, ExitCodes } from './exit-codes.js';

export type ServicePlatform = 'linux' | 'darwin';

/** A daemon setting carried into the service, in the order it appears in the file. */
export type EnvironmentEntry = readonly [name: string, value: string];

export interface SystemdUnitOptions {
  /** Absolute path of the node binary. */
  nodePath: string;
  /** Absolute path of the daemon program (dist/bin/qwen-tokend.js). */
  daemonPath: string;
  environment: readonly EnvironmentEntry[];
  /**
   * Directories the daemon writes (ReadWritePaths=): absolute paths, or `%t/...` for a
   * directory under the runtime dir that systemd gives the service.
   */
  writablePaths: readonly string[];
}

export interface LaunchdPlistOptions {
  nodePath: string;
  daemonPath: string;
  environment: readonly EnvironmentEntry[];
  /** Directory for the stdout/stderr files (`~/Library/Logs/qwen-tokend`). */
  logDir: string;
}

/**
 * The daemon settings a service carries over from the installing shell: every variable the
 * daemon reads (shared/config.ts, shared/url-trust.ts, daemon/gateway/limits.ts) that holds no
 * secret. An allow-list, not every QWEN_* variable: other tools keep API keys in QWEN_*
 * variables, and a unit file is world-readable. Left out on purpose: QWEN_TOKEND_AUTOSTART,
 * QWEN_TOKEND_BIN and QWEN_TOKEND_PROFILE (client settings the daemon never reads) and
 * QWEN_TOKEND_LOG_FILE (a service logs to the journal / launchd's files).
 */
export const CARRIED_SETTINGS = [
  'QWEN_TOKEN_PATH',
  'QWEN_HOME',
  'QWEN_TOKEND_SOCKET',
  // The config file (profiles, gateway): the daemon must write the one the CLI reads.
  'QWEN_TOKEND_CONFIG',
  'XDG_CONFIG_HOME',
  'QWEN_OAUTH_BASE_URL',
  'QWEN_OAUTH_CLIENT_ID',
  'QWEN_OAUTH_SCOPE',
  'QWEN_TOKEND_CHAT_HOSTS',
  'QWEN_TOKEND_REFRESH_LEAD_MS',
  'QWEN_TOKEND_RETRY_MS',
  'QWEN_TOKEND_REQUEST_RETRY_MS',
  'QWEN_TOKEND_HTTP_TIMEOUT_MS',
  'QWEN_TOKEND_QWEN_CLI_LOCK_STALE_MS',
  'QWEN_TOKEND_SILENT_CONNECTION_TIMEOUT_MS',
  'QWEN_TOKEND_QWEN_CLI_SYNC',
  'QWEN_TOKEND_LOG_LEVEL',
  'QWEN_TOKEND_GATEWAY_SOCKET',
  'QWEN_TOKEND_GATEWAY_MAX_HEADER_BYTES',
  'QWEN_TOKEND_GATEWAY_MAX_BODY_BYTES',
  'QWEN_TOKEND_GATEWAY_REPLAY_BYTES',
  'QWEN_TOKEND_GATEWAY_MAX_CONCURRENT',
  'QWEN_TOKEND_GATEWAY_HEADERS_TIMEOUT_MS',
  'QWEN_TOKEND_GATEWAY_REQUEST_TIMEOUT_MS',
  'QWEN_TOKEND_GATEWAY_UPSTREAM_TIMEOUT_MS',
] as const;

/** The systemd specifier for the socket directory the unit's RuntimeDirectory= creates. */
const RUNTIME_SOCKET_DIR = '%t/qwen-tokend';
const TEMPLATE_FILES = { systemd: join('systemd', 'qwen-tokend.service'), launchd: join('launchd', `${SERVICE_LABEL}.plist`) };

// ---- rendering (pure apart from reading the template) ------------------------------------

function readTemplate(which: keyof typeof TEMPLATE_FILES): string {
  return readFileSync(join(packageRoot(), TEMPLATE_FILES[which]), 'utf8');
}

function fill(template: string, values: Record<string, string>): string {
  return template.replace(/@([A-Z_]+)@/g, (whole, name: string) => {
    const value = values[name];
    if (value === undefined) throw new Error(`service template has an unknown placeholder ${whole}`);
    return value;
  });
}

function checkValue(what: string, value: string): void {
  // Control characters cannot be written safely into either format (and are never intended).
  if (/[\u0000-\u001f\u007f]/.test(value)) throw new Error(`${what} contains a control character; refusing to write it into a service file`);
}

function checkAbsolute(what: string, path: string): void {
  checkValue(what, path);
  if (!isAbsolute(path)) throw new Error(`${what} must be an absolute path, got "${path}"`);
}

/** Escapes for a systemd double-quoted string: C escapes for `\` and `"`, `%%` for a literal `%`. */
function systemdQuoted(value: string): string {
  return `"${value.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/%/g, '%%')}"`;
}

/**
 * One ExecStart= word, quoted when needed, `%` doubled (specifiers). In arguments `$` is doubled
 * too (variable expansion); the executable itself is not expanded, so there `$$` would stay literal.
 */
function systemdExecWord(value: string, executable: boolean): string {
  if (/^[A-Za-z0-9_@+=:,./-]+$/.test(value)) return value;
  const quoted = systemdQuoted(value);
  return executable ? quoted : quoted.replace(/\$/g, '$$$$');
}

function isInside(parent: string, child: string): boolean {
  const rel = relative(parent, child);
  return rel === '' || (!rel.startsWith('..') && !isAbsolute(rel));
}

function underTmp(path: string): boolean {
  return ['/tmp', '/var/tmp'].some((tmp) => isInside(tmp, path));
}

/** Renders the systemd user unit from `systemd/qwen-tokend.service`. */
export function renderSystemdUnit(options: SystemdUnitOptions, template = readTemplate('systemd')): string {
  checkAbsolute('the node binary path', options.nodePath);
  checkAbsolute('the daemon path', options.daemonPath);
  const environment = options.environment.map(([name, value]) => {
    checkValue(name, value);
    return `Environment=${systemdQuoted(`${name}=${value}`)}`;
  });
  const writable = options.writablePaths.map((p) => {
    if (p.startsWith('%t/')) return `-${p}`;
    checkAbsolute('a writable path', p);
    // "-": a missing directory is not a start failure; the daemon then reports it itself.
    return systemdQuoted(`-${p}`);
  });
  const tmpPaths = options.writablePaths.filter((p) => !p.startsWith('%') && underTmp(p));
  const args = [...DAEMON_NODE_FLAGS, options.daemonPath].map((a) => systemdExecWord(a, false));
  return fill(template, {
    // Started as autostart starts it: the same Node options and C library settings.
    EXEC_START: [systemdExecWord(options.nodePath, true), ...args].join(' '),
    ENVIRONMENT: [
      `Environment=${systemdQuoted(`GLIBC_TUNABLES=${DAEMON_GLIBC_TUNABLES}`)}`,
      ...(environment.length > 0 ? environment : ['# No QWEN_* settings were set at install time: the daemon uses its defaults.']),
    ].join('\n'),
    READ_WRITE_PATHS: writable.join(' '),
    PRIVATE_TMP:
      tmpPaths.length === 0
        ? 'PrivateTmp=yes'
        : `# PrivateTmp= left out: ${tmpPaths.join(', ')} is under /tmp and must stay visible to clients.`,
  });
}

function xmlEscape(value: string): string {
  return value.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&apos;');
}

/** Renders the launchd agent from `launchd/io.github.qwen-tokend.plist`. */
export function renderLaunchdPlist(options: LaunchdPlistOptions, template = readTemplate('launchd')): string {
  checkAbsolute('the node binary path', options.nodePath);
  checkAbsolute('the daemon path', options.daemonPath);
  checkAbsolute('the log directory', options.logDir);
  const environment = options.environment.map(([name, value]) => {
    checkValue(name, value);
    return `    <key>${xmlEscape(name)}</key>\n    <string>${xmlEscape(value)}</string>`;
  });
  return fill(template, {
    LABEL: xmlEscape(SERVICE_LABEL),
    NODE: xmlEscape(options.nodePath),
    NODE_FLAGS: DAEMON_NODE_FLAGS.map((f) => `    <string>${xmlEscape(f)}</string>`).join('\n'),
    DAEMON: xmlEscape(options.daemonPath),
    ENVIRONMENT: environment.join('\n'),
    STDOUT_PATH: xmlEscape(join(options.logDir, 'qwen-tokend.log')),
    STDERR_PATH: xmlEscape(join(options.logDir, 'qwen-tokend.err.log')),
  });
}

// ---- what to install on this machine ------------------------------------------------------

export interface ServicePlan {
  platform: ServicePlatform;
  config: TokendConfig;
  filePath: string;
  nodePath: string;
  daemonPath: string;
  environment: EnvironmentEntry[];
  /** Directories to create (0700) before the first start. */
  createDirs: string[];
  /** The rendered unit or plist. */
  contents: string;
}

/** Works out the file to install for `platform` from the installing shell's environment. */
export function planService(env: NodeJS.ProcessEnv, platform: ServicePlatform, nodePath = process.execPath): ServicePlan {
  const config = resolveConfig(env, { platform });
  const daemonPath = config.daemonBin ? resolve(config.daemonBin) : packagedDaemonBin();
  // Paths are written resolved: the service does not run in the installing shell's directory.
  const gatewaySocketRaw = env.QWEN_TOKEND_GATEWAY_SOCKET?.trim();
  const gatewaySocket = gatewaySocketRaw ? expandHome(gatewaySocketRaw, config.home) : undefined;
  const resolved: Record<string, string | undefined> = {
    QWEN_TOKEN_PATH: config.tokenPath,
    QWEN_HOME: config.qwenHome,
    QWEN_TOKEND_SOCKET: config.socketPath,
    QWEN_TOKEND_CONFIG: config.configPath,
    XDG_CONFIG_HOME: env.XDG_CONFIG_HOME?.trim() ? expandHome(env.XDG_CONFIG_HOME.trim(), config.home) : undefined,
    QWEN_TOKEND_GATEWAY_SOCKET: gatewaySocket,
  };
  const environment: EnvironmentEntry[] = [];
  for (const name of CARRIED_SETTINGS) {
    const raw = env[name]?.trim();
    if (raw) environment.push([name, resolved[name] ?? raw]);
  }
  const customSocket = Boolean(env.QWEN_TOKEND_SOCKET?.trim());
  const createDirs = [config.stateDir];
  if (platform === 'darwin') {
    // launchd does not promise the agent the shell's per-user TMPDIR, which the default
    // socket path depends on: pin the path the clients of this user look at.
    if (!customSocket) environment.push(['QWEN_TOKEND_SOCKET', config.socketPath]);
    // No sandbox here (unlike the systemd unit): the daemon creates the config, socket and
    // Qwen CLI directories itself when it first needs them.
    const logDir = join(config.home, 'Library', 'Logs', 'qwen-tokend');
    createDirs.push(logDir);
    const contents = renderLaunchdPlist({ nodePath, daemonPath, environment, logDir });
    return { platform, config, filePath: serviceFilePath(config.home, 'darwin'), nodePath, daemonPath, environment, createDirs, contents };
  }
  // ProtectSystem=strict: only these directories are writable, and the daemon cannot create
  // them itself, so install creates the ones it will need.
  const writablePaths = [config.stateDir];
  const writable = (dir: string): void => {
    if (writablePaths.some((p) => !p.startsWith('%') && isInside(p, dir))) return;
    writablePaths.push(dir);
    createDirs.push(dir);
  };
  if (config.qwenCliSync) writable(config.qwenHome);
  // `profile add/remove/default` and `gateway enable` write the config file (temp file + rename).
  writable(dirname(config.configPath));
  if (!customSocket) writablePaths.push(RUNTIME_SOCKET_DIR);
  else writable(dirname(config.socketPath));
  // The gateway's socket sits beside the token socket unless set apart.
  if (gatewaySocket) writable(dirname(gatewaySocket));
  const contents = renderSystemdUnit({ nodePath, daemonPath, environment, writablePaths });
  return { platform, config, filePath: serviceFilePath(config.home, 'linux'), nodePath, daemonPath, environment, createDirs, contents };
}

// ---- running the service manager ------------------------------------------------------------

interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a service-manager command; resolves with its exit code, rejects only when it cannot run. */
function run(command: string, args: readonly string[]): Promise<RunResult> {
  return new Promise((done, fail) => {
    execFile(command, args, { encoding: 'utf8', timeout: 60_000 }, (err, stdout, stderr) => {
      if (err && typeof err.code === 'string') {
        fail(
          new Error(
            err.code === 'ENOENT'
              ? `${command} was not found on PATH (${command === 'systemctl' ? 'is this a systemd system?' : 'is this macOS?'})`
              : `could not run ${command}: ${err.message}`,
          ),
        );
        return;
      }
      done({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
    });
  });
}

function describe(command: string, args: readonly string[]): string {
  return [command, ...args].join(' ');
}

/** Runs a command that must succeed; the error names the command and shows its output. */
async function must(command: string, args: readonly string[]): Promise<RunResult> {
  const result = await run(command, args);
  if (result.code !== 0) {
    const said = (result.stderr.trim() || result.stdout.trim()).split('\n').slice(0, 5).join('\n  ');
    let hint = '';
    if (/connect to bus|XDG_RUNTIME_DIR|DBUS_SESSION_BUS_ADDRESS/i.test(said)) {
      hint = '\n  (no systemd user session here: log in as this user directly, not via su/sudo, or run `loginctl enable-linger $USER` and log in again)';
    }
    throw new Error(`\`${describe(command, args)}\` failed (exit ${result.code})${said ? `:\n  ${said}` : ''}${hint}`);
  }
  return result;
}

/** A daemon that answered on the socket: what `service status` reports of it. */
interface AnsweringDaemon {
  pid: number;
  socket: string;
}

/** Asks the socket whether a daemon answers (never starts one). */
async function probeDaemon(env: NodeJS.ProcessEnv): Promise<AnsweringDaemon | null> {
  // Loaded on demand: `--print` and `uninstall` need no client.
  const { TokenClient } = await import('../token-client.js');
  const client = new TokenClient({ env, autostart: false, reconnectWindowMs: 0, requestTimeoutMs: 2_000 });
  try {
    const hello = await client.hello();
    return { pid: hello.pid, socket: client.config.socketPath };
  } catch {
    return null;
  } finally {
    await client.close();
  }
}

/** Writes the service file readable by all (service managers require it) and owned by the user. */
async function writeServiceFile(path: string, contents: string): Promise<void> {
  await mkdir(dirname(path), { recursive: true, mode: 0o755 });
  const temp = `${path}.${process.pid}.tmp`;
  try {
    await writeFile(temp, contents, { mode: 0o644 });
    // The umask may have taken bits away; systemd and launchd want exactly this.
    await chmod(temp, 0o644);
    await rename(temp, path);
  } catch (err) {
    await rm(temp, { force: true });
    throw err;
  }
}

// ---- the commands ---------------------------------------------------------------------------

interface Io {
  out(text: string): void;
  warn(text: string): void;
}

const io: Io = {
  out: (text) => void process.stdout.write(`${text}\n`),
  warn: (text) => void process.stderr.write(`${text}\n`),
};

function platformOf(option: string | undefined): ServicePlatform {
  const platform = option ?? process.platform;
  if (platform !== 'linux' && platform !== 'darwin') {
    throw new Error(`services are supported on Linux (systemd) and macOS (launchd), not on ${platform}`);
  }
  return platform;
}

function lingerEnabled(): boolean {
  try {
    return existsSync(join('/var/lib/systemd/linger', userInfo().username));
  } catch {
    return false;
  }
}

async function installSystemd(plan: ServicePlan, env: NodeJS.ProcessEnv): Promise<void> {
  const existed = existsSync(plan.filePath);
  // A daemon that answers while no unit is installed was started by hand or by a client.
  const unmanaged = existed ? null : await probeDaemon(env);
  for (const dir of plan.createDirs) await mkdir(dir, { recursive: true, mode: 0o700 });
  await writeServiceFile(plan.filePath, plan.contents);
  io.out(`Wrote ${plan.filePath}`);
  const leftInPlace = `\n  ${plan.filePath} is installed, so clients will not autostart a daemon; delete it to undo.`;
  try {
    await must('systemctl', ['--user', 'daemon-reload']);
    if (unmanaged) {
      await must('systemctl', ['--user', 'enable', SYSTEMD_UNIT]);
    } else if (existed) {
      // A re-install (e.g. after a node upgrade) takes effect only after a restart.
      await must('systemctl', ['--user', 'enable', SYSTEMD_UNIT]);
      await must('systemctl', ['--user', 'restart', SYSTEMD_UNIT]);
    } else {
      await must('systemctl', ['--user', 'enable', '--now', SYSTEMD_UNIT]);
    }
  } catch (err) {
    throw new Error(`${errorText(err)}${leftInPlace}`);
  }
  if (unmanaged) {
    io.warn(
      `warning: a qwen-tokend that systemd did not start is running (pid ${unmanaged.pid}, socket ${unmanaged.socket}).\n` +
        `  The service is enabled but was not started, so it does not fail against that daemon.\n` +
        `  Stop it (kill ${unmanaged.pid}), then run: systemctl --user start ${SYSTEMD_UNIT}`,
    );
  } else {
    io.out(`qwen-tokend runs as the systemd user service ${SYSTEMD_UNIT} and starts at login.`);
  }
  io.out('  logs:   journalctl --user -u qwen-tokend');
  io.out('  status: qwen-token service status');
  if (!env.XDG_RUNTIME_DIR?.trim() && !env.QWEN_TOKEND_SOCKET?.trim()) {
    io.warn(
      'warning: XDG_RUNTIME_DIR is not set in this shell, so clients started from it look for the socket under\n' +
        `  ${plan.config.socketPath}, while the service listens in $XDG_RUNTIME_DIR/qwen-tokend/. Log in normally, or set QWEN_TOKEND_SOCKET for both.`,
    );
  }
  if (!lingerEnabled()) {
    io.out('To keep tokens fresh while you are not logged in (cron jobs, servers), run once:');
    io.out('  loginctl enable-linger $USER');
  }
}

async function launchdLoaded(service: string): Promise<boolean> {
  return (await run('launchctl', ['print', service])).code === 0;
}

async function installLaunchd(plan: ServicePlan, env: NodeJS.ProcessEnv): Promise<void> {
  const uid = process.getuid?.() ?? 0;
  const domain = `gui/${uid}`;
  const service = `${domain}/${SERVICE_LABEL}`;
  const existed = existsSync(plan.filePath);
  const unmanaged = existed ? null : await probeDaemon(env);
  for (const dir of plan.createDirs) await mkdir(dir, { recursive: true, mode: 0o700 });
  await writeServiceFile(plan.filePath, plan.contents);
  io.out(`Wrote ${plan.filePath}`);
  const logDir = join(plan.config.home, 'Library', 'Logs', 'qwen-tokend');
  if (unmanaged) {
    io.warn(
      `warning: a qwen-tokend that launchd did not start is running (pid ${unmanaged.pid}, socket ${unmanaged.socket}).\n` +
        `  The agent was installed but not loaded (it loads at your next login).\n` +
        `  Stop that daemon (kill ${unmanaged.pid}), then run: launchctl bootstrap ${domain} ${plan.filePath}`,
    );
    return;
  }
  try {
    if (await launchdLoaded(service)) {
      await must('launchctl', ['bootout', service]);
      // bootout returns before the old job is gone; bootstrapping over it fails with EIO.
      for (let i = 0; i < 50 && (await launchdLoaded(service)); i++) await sleep(100);
    }
    // A `launchctl disable` of an earlier install would make bootstrap refuse the agent.
    await must('launchctl', ['enable', service]);
    await must('launchctl', ['bootstrap', domain, plan.filePath]);
  } catch (err) {
    throw new Error(`${errorText(err)}\n  ${plan.filePath} is installed, so clients will not autostart a daemon; delete it to undo.`);
  }
  io.out(`qwen-tokend runs as the launchd agent ${SERVICE_LABEL} and starts at login.`);
  io.out(`  logs:   ${join(logDir, 'qwen-tokend.log')}`);
  io.out('  status: qwen-token service status');
  io.out('A launchd agent runs only while you are logged in.');
}

async function uninstall(platform: ServicePlatform, env: NodeJS.ProcessEnv): Promise<void> {
  const config = resolveConfig(env, { platform });
  const filePath = serviceFilePath(config.home, platform);
  if (!existsSync(filePath)) {
    io.out(`Not installed (${filePath} does not exist); nothing to do.`);
    return;
  }
  if (platform === 'linux') {
    await must('systemctl', ['--user', 'disable', '--now', SYSTEMD_UNIT]);
    await rm(filePath, { force: true });
    await must('systemctl', ['--user', 'daemon-reload']);
  } else {
    const service = `gui/${process.getuid?.() ?? 0}/${SERVICE_LABEL}`;
    if (await launchdLoaded(service)) await must('launchctl', ['bootout', service]);
    await rm(filePath, { force: true });
  }
  io.out(`Stopped the service and removed ${filePath}.`);
  io.out('Clients start the daemon on demand again (unless QWEN_TOKEND_AUTOSTART=0).');
}

/** Exit code of `status`: 0 running, 4 not installed or not running, 1 the service manager could not be asked. */
async function status(platform: ServicePlatform, env: NodeJS.ProcessEnv): Promise<number> {
  const config = resolveConfig(env, { platform });
  const filePath = serviceFilePath(config.home, platform);
  const installed = existsSync(filePath);
  io.out(`${platform === 'linux' ? 'unit' : 'agent'} file: ${filePath} (${installed ? 'installed' : 'not installed'})`);
  const daemon = await probeDaemon(env);
  io.out(daemon ? `daemon: answering on ${daemon.socket} (pid ${daemon.pid})` : `daemon: not answering on ${config.socketPath}`);
  if (!installed) return ExitCodes.daemonUnavailable;
  const [command, args] =
    platform === 'linux'
      ? (['systemctl', ['--user', 'status', SYSTEMD_UNIT]] as const)
      : (['launchctl', ['print', `gui/${process.getuid?.() ?? 0}/${SERVICE_LABEL}`]] as const);
  const result = await run(command, args);
  io.out('');
  if (result.stdout) process.stdout.write(result.stdout);
  if (result.stderr) process.stderr.write(result.stderr);
  const running = platform === 'linux' ? result.code === 0 : result.code === 0 && /\bstate = running\b/.test(result.stdout);
  return running ? ExitCodes.ok : ExitCodes.daemonUnavailable;
}

function platformOption(): Option {
  return new Option('--platform <platform>', 'service manager to target').choices(['linux', 'darwin']).hideHelp();
}

/**
 * Runs an action; a failure becomes one clear message on stderr and exit code 1. The exit
 * code travels as a `CommandExit`, which the qwen-token program turns into the process's.
 */
async function guarded(name: string, action: () => Promise<number | void>): Promise<void> {
  let code: number | void;
  try {
    code = await action();
  } catch (err) {
    io.warn(`qwen-token service ${name}: ${errorText(err)}`);
    throw new CommandExit(ExitCodes.error);
  }
  if (code === ExitCodes.daemonUnavailable) throw new CommandExit(code);
}

/** The `service` command group (install, uninstall, status) for the qwen-token CLI. */
export function serviceCommand(): Command {
  const service = new Command('service')
    .description('run qwen-tokend as a user service (systemd on Linux, launchd on macOS)')
    .addHelpText(
      'after',
      '\nWhile the service is installed, clients never start a daemon themselves: the service manager does.',
    );

  service
    .command('install')
    .description('install the service for this user, enable it at login and start it now')
    .option('--print', 'only print the unit/plist that would be installed; write and run nothing')
    .addOption(platformOption())
    .addHelpText(
      'after',
      '\nThe file records the absolute paths of this node binary and of the daemon, and the QWEN_*\n' +
        'settings of this shell (QWEN_TOKEN_PATH, QWEN_HOME, QWEN_TOKEND_SOCKET, ...). Run it again after\n' +
        'moving node or the package, or after changing those settings.\n' +
        'Linux:  ~/.config/systemd/user/qwen-tokend.service, then systemctl --user enable --now\n' +
        'macOS:  ~/Library/LaunchAgents/io.github.qwen-tokend.plist, then launchctl bootstrap gui/$UID',
    )
    .action((opts: { print?: boolean; platform?: string }, cmd: Command) =>
      guarded('install', async () => {
        const platform = platformOf(opts.platform);
        const env = commandEnv(cmd.optsWithGlobals<GlobalOptions>());
        const plan = planService(env, platform);
        if (opts.print) {
          process.stdout.write(plan.contents);
          return;
        }
        if (!existsSync(plan.daemonPath)) {
          throw new Error(`the daemon ${plan.daemonPath} does not exist (run \`npm run build\`, or set QWEN_TOKEND_BIN)`);
        }
        if (platform === 'linux') await installSystemd(plan, env);
        else await installLaunchd(plan, env);
      }),
    );

  service
    .command('uninstall')
    .description('stop the service, disable it and remove its unit/plist')
    .addOption(platformOption())
    .action((opts: { platform?: string }, cmd: Command) => guarded('uninstall', () => uninstall(platformOf(opts.platform), commandEnv(cmd.optsWithGlobals<GlobalOptions>()))));

  service
    .command('status')
    .description("show whether the service is installed and running (the service manager's own report)")
    .addOption(platformOption())
    .addHelpText('after', '\nExit code: 0 running, 4 not installed or not running, 1 the service manager could not be asked.')
    .action((opts: { platform?: string }, cmd: Command) => guarded('status', () => status(platformOf(opts.platform), commandEnv(cmd.optsWithGlobals<GlobalOptions>()))));

  return service;
}
