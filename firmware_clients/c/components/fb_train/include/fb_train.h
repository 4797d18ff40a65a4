/*
 * fb_train: multinomial logistic regression in float32, trained with
 * full-batch gradient descent on softmax cross-entropy: the same math as
 * fedbus's numpy trainer (fedbus/learning/numpy_models.py, trainers.py) when
 * batch_size covers every sample.
 *
 * Per step, with logits z = x @ w + b over the n local samples:
 *   delta = (softmax(z) - onehot(y)) / n
 *   grad_w = x^T @ delta, grad_b = sum_rows(delta)
 *   g += mu * (p - p_global)      (FedProx; skipped when mu == 0)
 *   p -= lr * g
 * The gradient is accumulated sample by sample, so the only scratch memory is
 * one row of `out` floats plus the gradients themselves.
 */
#ifndef FB_TRAIN_H
#define FB_TRAIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    uint32_t n;
    uint32_t features;
    const float *x; /* n x features, row-major */
    const uint8_t *y; /* n labels */
} fb_dataset;

typedef struct {
    uint32_t in;
    uint32_t out;
    float *w; /* in x out, row-major: the wire's "dense0.w" */
    float *b; /* out: "dense0.b" */
} fb_logreg;

typedef struct {
    uint32_t epochs; /* gradient steps (one full batch per epoch) */
    float lr;
    float mu; /* FedProx; 0 for FedAvg */
    const uint8_t *anchor_w_le; /* the round's global weights, little-endian (only when mu > 0) */
    const uint8_t *anchor_b_le;
} fb_fit_config;

/* Train in place. grad_w (in*out), grad_b (out) and scratch (out) are caller memory.
 * *train_loss: the mean loss before the last step (fedbus's train_loss).
 * Returns 0, or -1 when a label is out of range or there is no data. */
int fb_train_fit(fb_logreg *m, const fb_dataset *d, const fb_fit_config *cfg, float *grad_w, float *grad_b,
                 float *scratch, double *train_loss);

/* Mean cross-entropy and accuracy; scratch holds `out` floats. */
void fb_train_evaluate(const fb_logreg *m, const fb_dataset *d, float *scratch, double *loss, double *accuracy);

/* Scratch memory in bytes a fit needs besides the model: grads and one row. */
size_t fb_train_scratch_bytes(uint32_t in, uint32_t out);

#ifdef __cplusplus
}
#endif
#endif
