// The loss history one trainer node shows: live events while it runs, the final curve after.
// Pure state, no DOM: the extension feeds it events and ui outputs and draws what it holds.

/** Keeps the steps and losses of one training run. */
export class LossHistory {
  constructor() {
    this.clear();
  }

  /** Forgets everything (a new run starts). */
  clear() {
    /** @type {number[]} */ this.steps = [];
    /** @type {number[]} */ this.losses = [];
    this.total = 0;
    this.lastLr = NaN;
    this.finished = false;
  }

  get length() {
    return this.steps.length;
  }

  /** The latest step number, or 0 before the first. */
  get lastStep() {
    return this.steps.length ? this.steps[this.steps.length - 1] : 0;
  }

  /** The latest loss, or NaN before the first. */
  get lastLoss() {
    return this.losses.length ? this.losses[this.losses.length - 1] : NaN;
  }

  /**
   * Adds one live event {step, total, loss, lr}. A step not after the previous one, or an event arriving after
   * the run finished, starts a new run. Returns true when the history was reset first.
   * @param {{step: number, total: number, loss: number, lr: number}} ev
   */
  addEvent(ev) {
    let reset = false;
    if (this.finished || (this.steps.length && ev.step <= this.lastStep)) {
      this.clear();
      reset = true;
    }
    this.steps.push(ev.step);
    this.losses.push(ev.loss);
    if (Number.isFinite(ev.total) && ev.total > 0) this.total = ev.total;
    this.lastLr = ev.lr;
    return reset;
  }

  /**
   * Continues an unfinished run from saved points (e.g. the curve stored in the workflow when the node was
   * re-created mid-run); later events append to them.
   * @param {number[]} steps increasing step numbers
   * @param {number[]} losses same length
   * @param {number} total planned steps (0 when unknown)
   */
  resume(steps, losses, total) {
    if (steps.length !== losses.length) throw new RangeError(`steps and losses differ in length: ${steps.length} vs ${losses.length}`);
    const lr = this.lastLr;
    this.clear();
    this.lastLr = lr;
    this.steps = steps.slice();
    this.losses = losses.slice();
    this.total = Number.isFinite(total) && total > 0 ? total : 0;
  }

  /**
   * Replaces the history by the final per-step losses of a finished run (step i+1 has loss[i]).
   * @param {number[]} losses
   * @param {number} [firstStep] step number of losses[0] (a resumed run starts later), default 1
   */
  setFinal(losses, firstStep = 1) {
    const lr = this.lastLr;
    this.clear();
    this.lastLr = lr;
    for (let i = 0; i < losses.length; i++) {
      this.steps.push(firstStep + i);
      this.losses.push(losses[i]);
    }
    this.total = this.lastStep;
    this.finished = true;
  }
}

/**
 * Step number of the first loss of a final curve of `count` losses. The output's own first_step wins; without
 * it a run that was followed live ends at its last live step (a resumed run starts after step 1), else 1.
 * @param {LossHistory} history the live history before the final curve replaces it
 * @param {number} count number of final losses
 * @param {number | null} explicit first_step from the output, or null
 */
export function firstStepOfFinal(history, count, explicit) {
  if (Number.isInteger(explicit) && explicit >= 0) return explicit;
  if (history.length && !history.finished && history.lastStep >= count) return history.lastStep - count + 1;
  return 1;
}
