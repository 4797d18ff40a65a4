/* fb_train: see fb_train.h. */
#include "fb_train.h"

#include <math.h>
#include <string.h>

#include "fb_msgpack.h"

size_t fb_train_scratch_bytes(uint32_t in, uint32_t out) {
    return sizeof(float) * ((size_t)in * out + 2u * out);
}

/* Logits of one row into z; returns the max logit. */
static float row_logits(const fb_logreg *m, const float *x, float *z) {
    uint32_t j, k;
    float mx;
    for (k = 0; k < m->out; k++) z[k] = 0.0f;
    for (j = 0; j < m->in; j++) {
        const float xj = x[j];
        const float *wr = m->w + (size_t)j * m->out;
        if (xj == 0.0f) continue;
        for (k = 0; k < m->out; k++) z[k] += xj * wr[k];
    }
    mx = -INFINITY;
    for (k = 0; k < m->out; k++) {
        z[k] += m->b[k];
        if (z[k] > mx) mx = z[k];
    }
    return mx;
}

int fb_train_fit(fb_logreg *m, const fb_dataset *d, const fb_fit_config *cfg, float *grad_w, float *grad_b,
                 float *scratch, double *train_loss) {
    uint32_t e, i, j, k;
    const size_t nw = (size_t)m->in * m->out;
    const float inv_n = 1.0f / (float)d->n;
    *train_loss = 0.0;
    if (d->n == 0 || d->features != m->in) return -1;
    for (i = 0; i < d->n; i++)
        if (d->y[i] >= m->out) return -1;
    for (e = 0; e < cfg->epochs; e++) {
        double loss_sum = 0.0;
        memset(grad_w, 0, nw * sizeof(float));
        memset(grad_b, 0, m->out * sizeof(float));
        for (i = 0; i < d->n; i++) {
            const float *x = d->x + (size_t)i * d->features;
            float *z = scratch;
            float mx = row_logits(m, x, z), total = 0.0f;
            const uint32_t y = d->y[i];
            for (k = 0; k < m->out; k++) {
                z[k] -= mx;
                total += expf(z[k]);
            }
            loss_sum += (double)(logf(total) - z[y]);
            for (k = 0; k < m->out; k++) z[k] = expf(z[k]) / total; /* z now holds delta */
            z[y] -= 1.0f;
            for (k = 0; k < m->out; k++) {
                z[k] *= inv_n;
                grad_b[k] += z[k];
            }
            for (j = 0; j < m->in; j++) {
                const float xj = x[j];
                float *gr = grad_w + (size_t)j * m->out;
                if (xj == 0.0f) continue;
                for (k = 0; k < m->out; k++) gr[k] += xj * z[k];
            }
        }
        *train_loss = loss_sum / d->n;
        for (j = 0; j < nw; j++) {
            float g = grad_w[j];
            if (cfg->mu > 0.0f && cfg->anchor_w_le) g += cfg->mu * (m->w[j] - fb_get_f32le(cfg->anchor_w_le + 4 * j));
            m->w[j] -= cfg->lr * g;
        }
        for (k = 0; k < m->out; k++) {
            float g = grad_b[k];
            if (cfg->mu > 0.0f && cfg->anchor_b_le) g += cfg->mu * (m->b[k] - fb_get_f32le(cfg->anchor_b_le + 4 * k));
            m->b[k] -= cfg->lr * g;
        }
    }
    return 0;
}

void fb_train_evaluate(const fb_logreg *m, const fb_dataset *d, float *scratch, double *loss, double *accuracy) {
    uint32_t i, k, correct = 0;
    double loss_sum = 0.0;
    for (i = 0; i < d->n; i++) {
        const float *x = d->x + (size_t)i * d->features;
        float mx = row_logits(m, x, scratch), total = 0.0f;
        uint32_t best = 0;
        for (k = 0; k < m->out; k++) {
            if (scratch[k] > scratch[best]) best = k;
            total += expf(scratch[k] - mx);
        }
        if (d->y[i] < m->out) loss_sum += (double)(logf(total) - (scratch[d->y[i]] - mx));
        if (best == d->y[i]) correct++;
    }
    *loss = d->n ? loss_sum / d->n : 0.0;
    *accuracy = d->n ? (double)correct / d->n : 0.0;
}
