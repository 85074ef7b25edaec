// The one way the viewer drivers start Chromium: the system's binary (env CHROMIUM) with a
// fresh profile (env USER_DATA_DIR), headless, with the flags this closed network needs
// (no background connections, no sandbox as root).
const { chromium } = require("playwright-core");

const FLAGS = [
  "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

function launch(options = {}) {
  return chromium.launchPersistentContext(process.env.USER_DATA_DIR, {
    executablePath: process.env.CHROMIUM,
    headless: true,
    args: FLAGS,
    timeout: 30000,
    ...options,
  });
}

module.exports = { launch };
