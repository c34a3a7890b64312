// Loads castellum's admin console in Debian's headless Chromium while a storm of refused
// requests hits one CA, and reports what the CA's cell draws: its charts, their points, and the
// refusals/s it shows, read twice a moment apart. Usage: node history.mjs ADMIN_URL TOKEN CA
import { chromium } from "playwright-core";

const [, , base, token, ca] = process.argv;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${base}/admin`);
  await page.fill("#token", token);
  await page.click("#sign-in");
  const read = () => page.evaluate((ca) => {
    const cell = document.querySelector(`.cell[data-ca="${ca}"]`);
    const history = cell && cell.querySelector(".history");
    if (!history) return null;
    const series = Object.fromEntries([...history.querySelectorAll(".series")].map((s) => [
      s.dataset.series,
      { label: s.querySelector("span").textContent, points: (s.querySelector("polyline").getAttribute("points") || "").split(" ").filter(Boolean).length },
    ]));
    return { points: Number(history.dataset.points), series };
  }, ca);
  await page.waitForFunction((ca) => Number(document.querySelector(`.cell[data-ca="${ca}"] .history`)?.dataset.points) >= 3,
    ca, { timeout: 15000 });
  const first = await read();
  await page.waitForTimeout(1500);
  const second = await read();
  console.log(JSON.stringify({ first, second, errors }));
} finally {
  await browser.close();
}
